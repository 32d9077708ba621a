"""Did the paper's claims hold in this run? One row per claim, dataset and condition.

The claims (paper Sec. 1, 4.2-4.4), each tested on the raw weights against the ADM recipe, for
the chosen +SAM and, as this project's extension, every fSGLD recipe:

C1  SAM is flatter: its LPF is lower than ADM's by more than 2 standard errors.
C2  EMA and SWA are not flatter: neither lowers ADM's LPF by more than 2 standard errors.
C3  SAM's metric changes less under weight quantization: |change| smaller than ADM's (per T').
C4  SAM has a smaller exposure gap: |mean eps-norm gap| smaller than ADM's (per T').
C5  SAM has a better metric at 20 sampling steps (the smallest T' when 20 is not sampled).

Standard error of an LPF difference: with one seed, from the paired Monte-Carlo draws (every
model sees the same weight-noise draws and evaluation set); with several seeds, from the paired
per-seed differences. C3-C5 compare means over seeds. "n.a." means the study lacks what the claim
needs (a metric, the ADM recipe, a SAM recipe, a quantized precision).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.report import paper
from pipeline.report.collect import Collected
from pipeline.report.render import Table
from pipeline.report.study import Study, algorithm_label
from pipeline.report.tables import (Choices, choice_notes, exposure_steps, fixed, has_metric, raw_average,
                                    seed_values, seeds_note, significant, weights_name)

YES, NO, NOT_APPLICABLE = "yes", "no", "n.a."


def lpf_difference(data: Collected, dataset: str, a: tuple[str, str], b: tuple[str, str]) -> tuple[float, float]:
    """LPF(a) - LPF(b) (means over seeds) and its standard error; a, b = (recipe, average)."""
    frames = []
    for recipe, average in (a, b):
        mask = (data.lpf.dataset == dataset) & (data.lpf.recipe == recipe) & (data.lpf.average == average)
        frames.append(data.lpf.loc[mask].sort_values("seed"))
    first, second = frames
    per_seed = first["lpf"].to_numpy() - second["lpf"].to_numpy()
    if len(per_seed) > 1:
        return float(per_seed.mean()), float(per_seed.std(ddof=1) / math.sqrt(len(per_seed)))
    draws_a, draws_b = first["draw_losses"].iloc[0], second["draw_losses"].iloc[0]
    if len(draws_a) != len(draws_b):
        # Files measured with different draw counts are not paired: combine their own errors.
        return float(per_seed[0]), float(math.hypot(first["stderr"].iloc[0], second["stderr"].iloc[0]))
    if len(draws_a) < 2:
        return float(per_seed[0]), 0.0  # one draw: no spread to estimate, the difference alone decides
    paired = draws_a - draws_b
    return float(per_seed[0]), float(paired.std(ddof=1) / math.sqrt(len(paired)))


def _paper_pair(value: float | None, reference: float | None, fmt: str = ".2f") -> str:
    if value is None or reference is None:
        return ""
    return f" (paper: {value:{fmt}} vs {reference:{fmt}})"


class _Context:
    """What every claim of one dataset needs: the study, the data, the rows compared with ADM."""

    def __init__(self, study: Study, data: Collected, choices: Choices, dataset: str) -> None:
        self.study, self.data, self.dataset = study, data, dataset
        self.name, self.raw, self.base = data.metric_name, raw_average(study), study.baseline
        self.flat = [c.recipe for c in choices.get(dataset, {}).values()] + study.fsgld_recipes

    def missing(self, metric: str | None = None, flat: bool = True) -> str:
        """Why a claim cannot be tested on this study, or "" when it can."""
        if self.base is None:
            return "no ADM recipe in the study"
        if flat and not self.flat:
            return "no SAM or fSGLD recipe in the study"
        if metric is not None and not has_metric(self.study, self.data, metric):
            return f"{metric} not in study.metrics"
        return ""

    def flat_labels(self) -> list[tuple[str | None, str]]:
        """(recipe, label) of each recipe tested against ADM; one placeholder row when there is none."""
        return [(r, self.study.label(r)) for r in self.flat] or [(None, "+SAM")]

    def row(self, claim_id: str, claim: str, algorithm: str, condition: str, held: str,
            evidence: str) -> dict[str, str]:
        return {"id": claim_id, "claim": claim, "dataset": self.dataset, "algorithm": algorithm,
                "condition": condition, "held": held, "evidence": evidence}


def _c1_flatter(c: _Context) -> list[dict[str, str]]:
    rows, condition = [], f"{weights_name(c.raw)} weights"
    for recipe, label in c.flat_labels():
        claim = f"{label} is flatter than ADM (lower LPF)"
        reason = c.missing("lpf")
        if reason:
            rows.append(c.row("C1", claim, label, condition, NOT_APPLICABLE, reason))
            continue
        diff, se = lpf_difference(c.data, c.dataset, (recipe, c.raw), (c.base, c.raw))
        ours = seed_values(c.data.lpf, "lpf", dataset=c.dataset, recipe=recipe, average=c.raw)
        adm = seed_values(c.data.lpf, "lpf", dataset=c.dataset, recipe=c.base, average=c.raw)
        evidence = f"LPF {significant(ours)} vs ADM {significant(adm)}: difference {diff:+.4g}, 2 SE = {2 * se:.2g}"
        if c.study.show_paper_numbers:
            evidence += _paper_pair(paper.paper_lpf(c.dataset, label), paper.paper_lpf(c.dataset, "ADM"), ".3f")
        rows.append(c.row("C1", claim, label, condition, YES if diff < -2 * se else NO, evidence))
    return rows


def _c2_averages(c: _Context) -> list[dict[str, str]]:
    averages = [a for a in ("ema", "swa") if a in c.study.averages]
    claim = "EMA and SWA do not make ADM flatter (LPF)"
    algorithms = ", ".join(algorithm_label("ADM", a) for a in averages) or "+EMA, +SWA"
    reason = (c.missing("lpf", flat=False) or ("" if averages else "neither ema nor swa in study.averages")
              or ("" if c.raw == "none" else "none (raw weights) not in study.averages"))
    if reason:
        return [c.row("C2", claim, algorithms, "vs raw weights", NOT_APPLICABLE, reason)]
    flatter, parts = [], []
    for average in averages:
        diff, se = lpf_difference(c.data, c.dataset, (c.base, average), (c.base, "none"))
        flatter.append(diff < -2 * se)
        values = seed_values(c.data.lpf, "lpf", dataset=c.dataset, recipe=c.base, average=average)
        parts.append(f"{algorithm_label('ADM', average)} {significant(values)} "
                     f"(difference {diff:+.4g}, 2 SE = {2 * se:.2g})")
    adm = seed_values(c.data.lpf, "lpf", dataset=c.dataset, recipe=c.base, average="none")
    return [c.row("C2", claim, algorithms, "vs raw weights", NO if any(flatter) else YES,
                  f"ADM {significant(adm)}; " + "; ".join(parts))]


def _c3_quantization(c: _Context) -> list[dict[str, str]]:
    rows = []
    quantized = c.study.quantized_precisions if "fp32" in c.study.precisions else []
    for recipe, label in c.flat_labels():
        claim = f"{label} changes {c.name} less than ADM under weight quantization"
        reason = c.missing() or ("" if quantized else "no fp32 / quantized precision pair")
        if reason:
            rows.append(c.row("C3", claim, label, "", NOT_APPLICABLE, reason))
            continue
        for precision in quantized:
            for steps in c.study.steps:
                changes = {r: _change(c.data, c.dataset, r, c.raw, precision, steps) for r in (recipe, c.base)}
                evidence = f"change {fixed(changes[recipe], signed=True)} vs ADM {fixed(changes[c.base], signed=True)}"
                numbers = (paper.paper_int8(c.dataset, label, steps), paper.paper_int8(c.dataset, "ADM", steps))
                if (paper.fid_comparable(c.study.show_paper_numbers, c.dataset, c.name) and precision == "int8"
                        and None not in numbers):
                    evidence += _paper_pair(numbers[0][2], numbers[1][2], "+.2f")
                held = abs(np.mean(changes[recipe])) < abs(np.mean(changes[c.base]))
                rows.append(c.row("C3", claim, label, f"{precision}, T'={steps}", YES if held else NO, evidence))
    return rows


def _c4_exposure(c: _Context) -> list[dict[str, str]]:
    rows = []
    for recipe, label in c.flat_labels():
        claim = f"{label} has a smaller exposure gap than ADM (eps-norm)"
        reason = c.missing("exposure")
        if reason:
            rows.append(c.row("C4", claim, label, "", NOT_APPLICABLE, reason))
            continue
        table1_steps = exposure_steps(c.data)
        for steps in sorted(set(c.data.exposure["steps"].tolist())):
            gaps = {r: seed_values(c.data.exposure, "gap_l2_mean", dataset=c.dataset, recipe=r, average=c.raw,
                                   steps=steps) for r in (recipe, c.base)}
            evidence = f"gap {fixed(gaps[recipe], signed=True)} vs ADM {fixed(gaps[c.base], signed=True)}"
            # The paper's one gap per model is set beside the T' that Table 1 shows.
            if c.study.show_paper_numbers and steps == table1_steps:
                evidence += _paper_pair(paper.paper_gap(c.dataset, label), paper.paper_gap(c.dataset, "ADM"), "+.2f")
            held = abs(np.mean(gaps[recipe])) < abs(np.mean(gaps[c.base]))
            rows.append(c.row("C4", claim, label, f"T'={steps}, L2 norm, mean over steps", YES if held else NO,
                              evidence))
    return rows


def _c5_fewer_steps(c: _Context) -> list[dict[str, str]]:
    rows = []
    steps = 20 if 20 in c.study.steps else c.study.steps[0]
    condition = f"T'={steps}, fp32, {weights_name(c.raw)} weights"
    for recipe, label in c.flat_labels():
        claim = f"{label} has a better {c.name} than ADM at T'={steps}"
        reason = c.missing() or ("" if "fp32" in c.study.precisions else "fp32 not in study.precisions")
        if reason:
            rows.append(c.row("C5", claim, label, condition, NOT_APPLICABLE, reason))
            continue
        values = {r: seed_values(c.data.fid, "value", dataset=c.dataset, recipe=r, average=c.raw, precision="fp32",
                                 steps=steps) for r in (recipe, c.base)}
        evidence = f"{c.name} {fixed(values[recipe])} vs ADM {fixed(values[c.base])}"
        if paper.fid_comparable(c.study.show_paper_numbers, c.dataset, c.name):
            evidence += _paper_pair(paper.paper_fid(c.dataset, label, steps), paper.paper_fid(c.dataset, "ADM", steps))
        if c.study.sam_selection == f"best_fid_{steps}" and c.study.describe(recipe).get("sam") is not None:
            evidence += "; this rho was selected by this very number"
        held = np.mean(values[recipe]) < np.mean(values[c.base])
        rows.append(c.row("C5", claim, label, condition, YES if held else NO, evidence))
    return rows


def claims_table(study: Study, data: Collected, choices: Choices) -> Table:
    """The claims table: columns id, claim, dataset, algorithm, condition, held, evidence."""
    rows: list[dict[str, str]] = []
    for dataset in study.datasets:
        context = _Context(study, data, choices, dataset)
        for claim in (_c1_flatter, _c2_averages, _c3_quantization, _c4_exposure, _c5_fewer_steps):
            rows += claim(context)
    notes = ["Claims of the paper tested on this run's numbers; fSGLD rows apply the same tests to this "
             "project's extension.",
             "C1/C2: 'flatter' = LPF lower by more than 2 standard errors of the difference (paired Monte-Carlo "
             "draws with one seed, paired seeds with several). C3-C5 compare means over seeds; C3 and C4 compare "
             "absolute values.",
             *choice_notes(choices), seeds_note(study)]
    return Table("claims", "Claims of the paper: did they hold in this run?", pd.DataFrame(rows), notes)


def _change(data: Collected, dataset: str, recipe: str, average: str, precision: str, steps: int) -> np.ndarray:
    key: dict[str, Any] = {"dataset": dataset, "recipe": recipe, "average": average, "steps": steps}
    return (seed_values(data.fid, "value", **key, precision=precision)
            - seed_values(data.fid, "value", **key, precision="fp32"))

