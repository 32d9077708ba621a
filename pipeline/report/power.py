"""The power table: for every claim row decided on seeds, how many seeds its effect needs.

A between-run claim row's interval is Student-t over per-seed paired differences d_s = A_s - B_s,
so its width rests on sd(d). For each row with two or more seeds this table gives sd(d), the
within-seed correlation of A and B with the sd that unpaired seeds would have given (what
pairing by seed saves), the seeds needed to decide an effect of the observed size at the report's
level (power 0.5 and 0.8), and the minimum detectable effect (power 0.8) at the study's seed
count and at report.power.target_seeds. The arithmetic is pipeline.stats.power's.
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.report.claims import claims_with_effects
from pipeline.report.collect import Collected
from pipeline.report.effects import Effect
from pipeline.report.render import Table
from pipeline.report.study import Study
from pipeline.report.tables import Choices
from pipeline.stats.power import minimum_detectable_effect, paired_spread, seeds_needed

POWERS = (0.5, 0.8)
MDE_POWER = 0.8


def _columns(target: int) -> list[str]:
    return ["id", "dataset", "condition", "measure", "comparison", "seeds", "mean difference", "sd difference",
            "correlation", "sd unpaired", *[f"seeds needed (power {p:g})" for p in POWERS],
            "MDE (study seeds)", f"MDE ({target} seeds)"]


def _number(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return ""
    return "inf" if math.isinf(value) else f"{value:{'+' if signed else ''}.4g}"


def _seeds(count: int | None) -> str:
    return "> 10000" if count is None else str(count)


def power_row(claim: pd.Series, effect_: Effect, level: float, target: int) -> dict[str, str]:
    """One table row from a claims row and the effect that decided it (t over >= 2 paired seeds)."""
    spread = paired_spread(effect_.sides[:, 0], effect_.sides[:, 1])
    measure, _, comparison = claim["measure"].partition(": ")
    row = {"id": claim["id"], "dataset": claim["dataset"], "condition": claim["condition"], "measure": measure,
           "comparison": comparison, "seeds": str(spread.n), "mean difference": _number(spread.mean_difference, signed=True),
           "sd difference": _number(spread.sd_difference), "correlation": _number(spread.correlation),
           "sd unpaired": _number(spread.sd_unpaired)}
    for power in POWERS:
        row[f"seeds needed (power {power:g})"] = _seeds(
            seeds_needed(spread.mean_difference, spread.sd_difference, level, power))
    row["MDE (study seeds)"] = _number(minimum_detectable_effect(spread.sd_difference, spread.n, level, MDE_POWER))
    row[f"MDE ({target} seeds)"] = _number(minimum_detectable_effect(spread.sd_difference, target, level, MDE_POWER))
    return row


def power_frame(study: Study, data: Collected, choices: Choices) -> tuple[pd.DataFrame, int]:
    """(the table's rows, how many decided rows were left out for resting on one seed)."""
    claims, effects = claims_with_effects(study, data, choices)
    target = study.power_target_seeds
    rows, one_seed = [], 0
    for (_, claim), effect_ in zip(claims.iterrows(), effects):
        if effect_ is None or effect_.sides is None:
            continue
        if effect_.basis != "seeds":
            one_seed += 1
            continue
        rows.append(power_row(claim, effect_, study.confidence, target))
    return pd.DataFrame(rows, columns=_columns(target)), one_seed


def power_table(study: Study, data: Collected, choices: Choices) -> Table:
    frame, one_seed = power_frame(study, data, choices)
    level = f"{100 * study.confidence:g}%"
    notes = [f"One row per claim row whose {level} interval is Student-t over two or more paired seeds. "
             f"mean difference, sd difference: mean and sd (ddof 1) over seeds of the per-seed difference A - B of "
             f"the two sides compared (|change| or |gap| where the claim compares those); correlation: Pearson r of "
             f"A and B across seeds (empty when a side does not vary); sd unpaired: sqrt(sd(A)^2 + sd(B)^2), the sd "
             f"of A - B had the two sides been run on independent seeds.",
             f"seeds needed: the fewest seeds whose {level} t interval excludes 0 for an effect of the observed size, "
             f"with probability 0.5 (the interval expected to just exclude 0) and 0.8, taking the observed sd as "
             f"the truth; MDE: the smallest effect decided with probability {MDE_POWER:g} at the study's seed count "
             f"and at report.power.target_seeds ({study.power_target_seeds}). The observed mean and sd come from "
             f"few seeds and are themselves uncertain: read these as a guide for the next design, not a verdict."]
    if one_seed:
        notes.append(f"{one_seed} claim row(s) rest on one training seed: their seed-to-seed sd is unknown, so they "
                     f"are left out (run two or more seeds to get them here).")
    if frame.empty and not one_seed:
        notes.append("No claim row compares two sides over two or more seeds.")
    return Table("power", "Power: seeds needed to decide each claim's observed effect", frame, notes)
