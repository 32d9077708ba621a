"""The claims table read the other way round: one answer per claim, and the rules stated once by kind.

Nothing is decided here: every verdict, effect and rule is a cell of the claims frame
(claims.py); this module only groups and counts them, so the answers always agree with the table.
"""

from __future__ import annotations

import dataclasses
import re

import pandas as pd

from pipeline.report.claims import INCONCLUSIVE, NOT_APPLICABLE
from pipeline.report.study import Study

VERDICTS = ("held", "not held", INCONCLUSIVE)
# A signed number in a rule is the row's margin ("above -0.0049"); "95%" and "below 0" are unsigned.
MARGIN = re.compile(r"(?<![\w.])[+-]\d[\d.]*(?:e[+-]?\d+)?")


@dataclasses.dataclass(frozen=True)
class Answer:
    """One claim (id and wording): its verdicts over the claims rows, each row's effect, the seeds."""

    claim_id: str
    claim: str
    counts: dict[str, int]
    effects: list[str]
    seeds: str  # training seeds behind the rows' effects: "3", or "3-8" when rows differ; "" if none

    def verdicts(self) -> str:
        """"held 2, inconclusive 1" (verdicts with no row left out)."""
        return ", ".join(f"{verdict} {n}" for verdict, n in self.counts.items() if n)


def verdict_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rows per verdict (held, not held, inconclusive, then n.a.)."""
    counts = {verdict: int((frame["verdict"] == verdict).sum()) for verdict in VERDICTS}
    counts[NOT_APPLICABLE] = int((frame["verdict"] == NOT_APPLICABLE).sum())
    return counts


def _seeds(rows: pd.DataFrame) -> str:
    """The rows' seed counts as one cell: "3", "3-8", or "" when no row was measured."""
    counts = sorted(int(n) for n in rows["seeds"] if str(n).strip())
    if not counts:
        return ""
    return str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"


def _effect(row: pd.Series, several_datasets: bool, several_conditions: bool) -> str:
    where = f"{row['dataset']}, " if several_datasets else ""
    where += f"{row['condition']}, " if several_conditions and row["condition"] else ""
    if row["verdict"] == NOT_APPLICABLE:
        return f"{where}{row['algorithm']}: n.a. ({row['rule']})"
    return f"{where}{row['measure']}: {row['effect [CI]']} → {row['verdict']}"


def answers(study: Study, frame: pd.DataFrame) -> list[Answer]:
    """One Answer per (claim id, claim wording), in the claims table's order."""
    several = frame["dataset"].nunique() > 1
    result = []
    for (claim_id, claim), rows in frame.groupby(["id", "claim"], sort=False):
        conditions = rows["condition"].nunique() > 1
        effects = [_effect(row, several, conditions) for _, row in rows.iterrows()]
        result.append(Answer(claim_id, claim, verdict_counts(rows), effects, _seeds(rows)))
    return result


def rule_kinds(frame: pd.DataFrame) -> tuple[list[str], pd.Series]:
    """The distinct rules with their margins written as m, and each row's kind ("R1", "R2 (m = -0.0049)")."""
    kinds: list[str] = []
    labels = []
    for rule in frame["rule"]:
        margins = MARGIN.findall(rule)
        kind = MARGIN.sub(lambda match: "-m" if match.group().startswith("-") else "m", rule)
        if kind not in kinds:
            kinds.append(kind)
        margin = f" (m = {margins[0].lstrip('+-')})" if margins else ""
        labels.append(f"R{kinds.index(kind) + 1}{margin}")
    return kinds, pd.Series(labels, index=frame.index, name="rule")
