"""Did the paper's claims hold? One row per claim, measure and condition: the effect, its interval,
the rule applied and the verdict (held / not held / inconclusive).

Claims of the paper (Sec. 1, 4.2-4.4, Tables 2-5), tested for the chosen +SAM and, as this
project's extension, every fSGLD recipe, always against ADM on the same dataset:

C1  flatter than ADM: lower LPF (absolute and filter-normalised), and for fSGLD, whose training
    perturbs the weights as the absolute LPF does, on measures it does not optimise: filter-
    normalised LPF, Hessian trace and top eigenvalue, loss increase along random directions.
C2  EMA and SWA do not make ADM flatter (no effect beyond the LPF margin).
C3  changes its metric less than ADM under weight quantization (|change| smaller), FD and KID.
C4  smaller exposure gap than ADM (|eps-norm gap| smaller), per T'.
C5  better metric than ADM at T'=20 (the smallest T' when 20 is not sampled), FD and KID.
C6  EMA improves ADM's metric over its raw weights.
C7  input perturbation (IP) does not make ADM flatter (no effect beyond the LPF margin).
C8  +SAM+EMA and +SAM+SWA are at least as good as +SAM (no worsening beyond the FD margin).
C9  +SAM+EMA changes its metric less under quantization than +EMA (Table 4).
C10 a stronger rho gives a flatter model (the grid's largest rho against its smallest).
Controls: PC, the strongest SAM rho against ADM on LPF (a real effect the study should detect);
NC, ADM against ADM trained with other seeds (no real effect: must come out inconclusive).

Every verdict follows pipeline.report.effects: held when the interval excludes 0 in the claimed
direction, not held when it excludes 0 in the other, inconclusive otherwise; no-effect claims
(C2, C7, C8) are equivalence tests against a margin stated in report.margins. Between training
runs, the interval comes from per-seed paired differences (t quantiles); with one seed such a
difference is never decided (inconclusive), whatever its draw-level interval says.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from pipeline.report.collect import Collected
from pipeline.report.effects import (INCONCLUSIVE, Arm, Effect, abs_difference, change_difference, difference,
                                     effect, exposure_arm, fd_arm, hessian_arm, kid_arm, lpf_arm,
                                     no_effect_verdict, perturbation_arm, verdict)
from pipeline.report.render import Table
from pipeline.report.study import Study, algorithm_label
from pipeline.report.tables import Choices, choice_notes, has_metric, raw_average, seeds_note, weights_name

NOT_APPLICABLE = "n.a."
COLUMNS = ["id", "claim", "dataset", "algorithm", "condition", "measure", "effect [CI]", "seeds", "interval", "rule",
           "verdict"]

ArmOf = Callable[[str, str], Arm]  # (recipe, average) -> arm


class _Context:
    """What every claim of one dataset needs."""

    def __init__(self, study: Study, data: Collected, choices: Choices, dataset: str) -> None:
        self.study, self.data, self.dataset = study, data, dataset
        self.name, self.raw, self.base = data.metric_name, raw_average(study), study.baseline
        self.level, self.seeds = study.confidence, study.seeds
        self.sam = [c.recipe for c in choices.get(dataset, {}).values()]
        self.flat = self.sam + study.fsgld_recipes
        self.rows: list[dict[str, str]] = []
        self.effects: list[Effect | None] = []  # one per row: what decided it (None for an n.a. row)

    # -- measures --------------------------------------------------------------------------
    def lpf_measures(self, increase: bool = False) -> list[tuple[str, ArmOf]]:
        """LPF per scaling; increase=True: LPF minus the unperturbed loss, since a recipe with a higher base
        loss can have the higher LPF although its loss rises less under the noise. The increase serves
        directional claims only: the equivalence margins are relative to LPF itself."""
        if not has_metric(self.study, self.data, "lpf"):
            return []
        sigma = float(self.data.lpf.loc[self.data.lpf["main"], "sigma"].iloc[0])
        scalings = sorted(set(self.data.lpf["scaling"]), key=lambda s: s != "absolute")
        name = "LPF increase over the loss" if increase else "LPF"
        return [(f"{name} {scaling} (sigma {sigma:g})",
                 lambda recipe, average, scaling=scaling: lpf_arm(self.data, self.dataset, recipe, average, scaling,
                                                                  increase=increase))
                for scaling in scalings]

    def flatness_measures(self, recipe: str) -> list[tuple[str, ArmOf]]:
        """LPF (and its increase over the loss) for SAM; for fSGLD only what its training does not optimise."""
        measures = self.lpf_measures() + self.lpf_measures(increase=True)
        if self.study.recipe(recipe).kind != "fsgld":
            return measures
        measures = [m for m in measures if "absolute" not in m[0]]
        if has_metric(self.study, self.data, "hessian"):
            for column, title in (("trace", "Hessian trace"), ("top_eigenvalue", "Hessian top eigenvalue")):
                measures.append((title, lambda r, a, column=column: hessian_arm(self.data, self.dataset, r, a, column)))
        if has_metric(self.study, self.data, "perturbation") and self.data.perturbation is not None:
            radius = float(self.data.perturbation["radius"].max())
            measures.append((f"loss increase at perturbation norm {radius:g}",
                             lambda r, a: perturbation_arm(self.data, self.dataset, r, a)))
        return measures

    def quality_measures(self) -> list[tuple[str, Callable[..., Arm]]]:
        """FD (the study's metric) and KID, each as (label, arm(recipe, average, precision, steps))."""
        return [(self.name, lambda r, a, p, t: fd_arm(self.data, self.dataset, r, a, p, t)),
                ("KID", lambda r, a, p, t: kid_arm(self.data, self.dataset, r, a, p, t))]

    def mean_value(self, arm: Arm) -> float:
        values = [r.value for r in (arm(s) for s in self.seeds) if r is not None]
        return float(np.mean(values)) if values else float("nan")

    # -- rows ------------------------------------------------------------------------------
    def add(self, claim_id: str, claim: str, algorithm: str, condition: str, measure: str,
            effect_: Effect | None, outcome: tuple[str, str] | None) -> None:
        if effect_ is None or outcome is None:
            self.skip(claim_id, claim, algorithm, f"{measure} was not measured for both sides")
            return
        self.rows.append({"id": claim_id, "claim": claim, "dataset": self.dataset, "algorithm": algorithm,
                          "condition": condition, "measure": measure, "effect [CI]": effect_.cell(),
                          "seeds": str(len(effect_.per_seed)), "interval": effect_.interval.method, "rule": outcome[1], "verdict": outcome[0]})
        self.effects.append(effect_)

    def skip(self, claim_id: str, claim: str, algorithm: str, reason: str) -> None:
        self.rows.append({"id": claim_id, "claim": claim, "dataset": self.dataset, "algorithm": algorithm,
                          "condition": "", "measure": "", "effect [CI]": "", "seeds": "", "interval": "", "rule": reason,
                          "verdict": NOT_APPLICABLE})
        self.effects.append(None)

    def pairs(self, claim_id: str, relation: str) -> list[tuple[str, str]]:
        """(recipe, its own base) for every SAM and fSGLD recipe; a recipe without a base gets an n.a. row."""
        pairs = []
        for recipe in self.flat:
            other = self.study.base_of(recipe)
            if other is None:
                optimizer = self.study.describe(recipe)["optimizer"]
                self.skip(claim_id, f"{self.label(recipe)} {relation} its base optimizer", self.label(recipe),
                          f"no recipe without IP/SAM/fSGLD trains with {optimizer['name']} at lr "
                          f"{optimizer['lr']:g} in the study (add one, e.g. recipes.sgd)")
                continue
            pairs.append((recipe, other))
        return pairs

    def compare(self, arms: list[Arm], combine, between_runs: bool) -> Effect | None:
        return effect(arms, combine, self.seeds, self.level, between_runs)

    def label(self, recipe: str, average: str | None = None) -> str:
        return algorithm_label(self.study.label(recipe), average or self.raw)

    def fp32_steps(self) -> list[int]:
        return self.study.steps_for("fp32") if "fp32" in self.study.precisions_for(self.raw) else []


# ------------------------------------------------------------------------------------------
# The claims.

def _c1_flatter(c: _Context) -> None:
    condition = f"{weights_name(c.raw)} weights"
    for recipe, other in c.pairs("C1", "is flatter than"):
        claim = f"{c.label(recipe)} is flatter than {c.label(other)}"
        measures = c.flatness_measures(recipe)
        if not measures:
            c.skip("C1", claim, c.label(recipe), "no flatness metric in study.metrics")
        for measure, arm in measures:
            eff = c.compare([arm(recipe, c.raw), arm(other, c.raw)], difference, between_runs=True)
            c.add("C1", claim, c.label(recipe), condition, f"{measure}: {c.label(recipe)} - {c.label(other)}", eff,
                  eff and verdict(eff, "lower"))


def _c2_averages(c: _Context) -> None:
    claim = "EMA and SWA do not make ADM flatter"
    for average in [a for a in ("ema", "swa") if a in c.study.averages and c.raw == "none"]:
        for measure, arm in c.lpf_measures():
            margin = c.study.margins["lpf_relative"] * c.mean_value(arm(c.base, c.raw))
            eff = c.compare([arm(c.base, average), arm(c.base, c.raw)], difference, between_runs=False)
            c.add("C2", claim, c.label(c.base, average), "same training run, vs raw weights",
                  f"{measure}: {c.label(c.base, average)} - ADM", eff, eff and no_effect_verdict(eff, margin, "lower"))


def _quantization_change(c: _Context, claim_id: str, claim: str, recipe: str, other: str, average: str) -> None:
    quantized = [p for p in c.study.precisions_for(average) if p != "fp32"]
    if "fp32" not in c.study.precisions_for(average) or not quantized:
        c.skip(claim_id, claim, c.label(recipe, average), f"no fp32 / quantized pair for {weights_name(average)} weights")
        return
    for precision in quantized:
        for steps in c.study.steps_for(precision):
            for measure, arm in c.quality_measures():
                arms = [arm(recipe, average, precision, steps), arm(recipe, average, "fp32", steps),
                        arm(other, average, precision, steps), arm(other, average, "fp32", steps)]
                eff = c.compare(arms, change_difference, between_runs=True)
                c.add(claim_id, claim, c.label(recipe, average), f"fp32 → {precision}, T'={steps}",
                      f"{measure}: |change| of {c.label(recipe, average)} - |change| of {c.label(other, average)}",
                      eff, eff and verdict(eff, "lower"))


def _c3_quantization(c: _Context) -> None:
    for recipe, other in c.pairs("C3", "changes its sample quality less under quantization than"):
        _quantization_change(c, "C3", f"{c.label(recipe)} changes its sample quality less than {c.label(other)} "
                                      f"under weight quantization", recipe, other, c.raw)


def _c4_exposure(c: _Context) -> None:
    if not has_metric(c.study, c.data, "exposure"):
        return
    for recipe, other in c.pairs("C4", "has a smaller exposure gap than"):
        claim = f"{c.label(recipe)} has a smaller exposure gap than {c.label(other)}"
        for steps in sorted(set(c.data.exposure["steps"].tolist())):
            arms = [exposure_arm(c.data, c.dataset, r, c.raw, steps) for r in (recipe, other)]
            eff = c.compare(arms, abs_difference, between_runs=True)
            c.add("C4", claim, c.label(recipe), f"T'={steps}",
                  f"|eps-norm gap|: {c.label(recipe)} - {c.label(other)}", eff, eff and verdict(eff, "lower"))


def _c5_fewer_steps(c: _Context) -> None:
    fp32 = c.fp32_steps()
    if not fp32:
        return
    steps = 20 if 20 in fp32 else fp32[0]
    for recipe, other in c.pairs("C5", "has better sample quality than"):
        claim = f"{c.label(recipe)} has better sample quality than {c.label(other)} at T'={steps}"
        for measure, arm in c.quality_measures():
            eff = c.compare([arm(recipe, c.raw, "fp32", steps), arm(other, c.raw, "fp32", steps)], difference,
                            between_runs=True)
            c.add("C5", claim, c.label(recipe), f"T'={steps}, fp32", f"{measure}: {c.label(recipe)} - {c.label(other)}",
                  eff, eff and verdict(eff, "lower"))


def _c6_ema_quality(c: _Context) -> None:
    if "ema" not in c.study.averages or c.raw != "none":
        return
    claim = "EMA improves ADM's sample quality over its raw weights"
    for steps in c.fp32_steps():
        for measure, arm in c.quality_measures():
            eff = c.compare([arm(c.base, "ema", "fp32", steps), arm(c.base, "none", "fp32", steps)], difference,
                            between_runs=False)
            c.add("C6", claim, "+EMA", f"same training run, T'={steps}, fp32", f"{measure}: +EMA - ADM", eff,
                  eff and verdict(eff, "lower"))


def _c7_ip(c: _Context) -> None:
    ips = [r for r in c.study.recipes if c.study.recipe(r).kind == "ip"]
    for recipe in ips:
        claim = f"{c.label(recipe)} does not make ADM flatter"
        for measure, arm in c.lpf_measures():
            margin = c.study.margins["lpf_relative"] * c.mean_value(arm(c.base, c.raw))
            eff = c.compare([arm(recipe, c.raw), arm(c.base, c.raw)], difference, between_runs=True)
            c.add("C7", claim, c.label(recipe), f"{weights_name(c.raw)} weights", f"{measure}: {c.label(recipe)} - ADM",
                  eff, eff and no_effect_verdict(eff, margin, "lower"))


def _c8_sam_averages(c: _Context) -> None:
    fp32 = c.fp32_steps()
    for recipe in c.sam:
        for average in [a for a in ("ema", "swa") if a in c.study.averages and c.raw == "none"]:
            claim = f"{c.label(recipe, average)} is at least as good as {c.label(recipe)}"
            for steps in fp32:
                for measure, arm in c.quality_measures():
                    margin = c.study.margins["fid_relative"] * c.mean_value(arm(recipe, "none", "fp32", steps))
                    eff = c.compare([arm(recipe, average, "fp32", steps), arm(recipe, "none", "fp32", steps)],
                                    difference, between_runs=False)
                    c.add("C8", claim, c.label(recipe, average), f"same training run, T'={steps}, fp32",
                          f"{measure}: {c.label(recipe, average)} - {c.label(recipe)}", eff,
                          eff and no_effect_verdict(eff, margin, "higher"))


def _c9_ema_quantization(c: _Context) -> None:
    if "ema" not in c.study.averages:
        return
    for recipe in c.sam:
        _quantization_change(c, "C9", f"{c.label(recipe, 'ema')} changes its sample quality less than +EMA under "
                                      f"weight quantization", recipe, c.base, "ema")


def _c10_rho(c: _Context) -> None:
    for label, group in c.study.sam_groups().items():
        if len(group) < 2:
            continue
        strong, weak = max(group, key=c.study.rho), min(group, key=c.study.rho)
        claim = f"a larger rho makes {label} flatter"
        for measure, arm in c.lpf_measures() + c.lpf_measures(increase=True):
            eff = c.compare([arm(strong, c.raw), arm(weak, c.raw)], difference, between_runs=True)
            c.add("C10", claim, f"{label} rho {c.study.rho(strong):g} vs {c.study.rho(weak):g}",
                  f"{weights_name(c.raw)} weights", f"{measure}: rho {c.study.rho(strong):g} - rho {c.study.rho(weak):g}",
                  eff, eff and verdict(eff, "lower"))


def _positive_control(c: _Context) -> None:
    sams = c.study.sam_recipes
    if not sams:
        return
    strongest = max(sams, key=c.study.rho)
    claim = f"positive control: SAM at its largest rho ({c.study.rho(strongest):g}) is flatter than ADM"
    for measure, arm in c.lpf_measures() + c.lpf_measures(increase=True):
        eff = c.compare([arm(strongest, c.raw), arm(c.base, c.raw)], difference, between_runs=True)
        c.add("PC", claim, f"{c.study.label(strongest)} rho {c.study.rho(strongest):g}", f"{weights_name(c.raw)} weights",
              f"{measure}: rho {c.study.rho(strongest):g} - ADM", eff, eff and verdict(eff, "lower"))


def _negative_control(c: _Context) -> None:
    """The control recipe's study seeds against its runs with report.negative_control.seeds, paired in order,
    on LPF and on the metric at the smallest T': the same rules as every between-run claim."""
    recipe = c.study.negative_control_recipe
    pairs = list(zip(c.study.seeds_of(recipe), c.study.negative_control_seeds))
    claim = f"negative control: {c.label(recipe)} differs from {c.label(recipe)} trained with other seeds"
    if not pairs:
        c.skip("NC", claim, c.label(recipe), "report.negative_control.seeds is empty: no control runs")
        return

    def paired(arm: Arm, side: int) -> Arm:
        return lambda index: arm(pairs[index][side])

    steps = min(c.study.steps)
    measures = [(m, arm(recipe, "none")) for m, arm in c.lpf_measures()]
    measures += [(f"{m} (T'={steps}, fp32)", arm(recipe, "none", "fp32", steps)) for m, arm in c.quality_measures()]
    condition = (f"seeds {', '.join(str(a) for a, _ in pairs)} vs {', '.join(str(b) for _, b in pairs)}, "
                 f"raw weights")
    for measure, arm in measures:
        eff = effect([paired(arm, 1), paired(arm, 0)], difference, list(range(len(pairs))), c.level,
                     between_runs=True)
        if eff is None:
            continue
        outcome = verdict(eff, "lower")
        if eff.basis != "seeds" and eff.draw_interval is not None:
            iv = eff.draw_interval
            alone = "excludes" if (iv.low > 0 or iv.high < 0) else "includes"
            outcome = (outcome[0], f"{outcome[1]} (the draw-level interval alone {alone} 0)")
        c.add("NC", claim, c.label(recipe), condition, f"{measure}: control runs - study runs", eff, outcome)


CLAIMS = (_c1_flatter, _c2_averages, _c3_quantization, _c4_exposure, _c5_fewer_steps, _c6_ema_quality, _c7_ip,
          _c8_sam_averages, _c9_ema_quantization, _c10_rho, _positive_control, _negative_control)


def claims_with_effects(study: Study, data: Collected, choices: Choices) -> tuple[pd.DataFrame, list[Effect | None]]:
    """The claims frame and, row by row, the effect that decided each row (None for n.a. rows)."""
    rows: list[dict[str, str]] = []
    effects: list[Effect | None] = []
    for dataset in study.datasets:
        context = _Context(study, data, choices, dataset)
        if context.base is None:
            context.skip("all", "every claim compares with ADM", "", "no ADM recipe in the study")
        else:
            for claim in CLAIMS:
                claim(context)
        rows += context.rows
        effects += context.effects
    return pd.DataFrame(rows, columns=COLUMNS), effects


def claims_frame(study: Study, data: Collected, choices: Choices) -> pd.DataFrame:
    return claims_with_effects(study, data, choices)[0]


def control_failures(frame: pd.DataFrame) -> list[str]:
    """Sentences flagging the run: a negative control that is not inconclusive, a positive one not held."""
    flags = []
    for _, row in frame[frame["id"] == "NC"].iterrows():
        if row["verdict"] not in (INCONCLUSIVE, NOT_APPLICABLE):
            flags.append(f"the negative control on {row['dataset']} ({row['measure']}) came out '{row['verdict']}': "
                         f"two ADM runs that differ only in their seed look different by these rules, so the "
                         f"study's intervals are too narrow; treat every verdict with suspicion.")
    for _, row in frame[frame["id"] == "PC"].iterrows():
        # With one seed the control cannot be decided at all: that is the one-seed rule, not a failure.
        if row["verdict"] == "not held":
            flags.append(f"the positive control on {row['dataset']} ({row['measure']}) is 'not held': by this "
                         f"measure SAM at its largest rho is decidedly less flat than ADM, the opposite of what the "
                         f"control expects; the measure does not see what SAM changes here, so read its other "
                         f"verdicts with care (LPF also rises with the unperturbed loss: see the LPF increase "
                         f"over the loss).")
        elif row["verdict"] not in ("held", NOT_APPLICABLE) and "one training seed" not in row["rule"]:
            flags.append(f"the positive control on {row['dataset']} ({row['measure']}) is '{row['verdict']}': the "
                         f"study did not detect even its strongest intervention, so 'inconclusive' elsewhere says "
                         f"little about whether an effect exists.")
    return flags


def claims_table(study: Study, data: Collected, choices: Choices) -> Table:
    """The claims table: columns id, claim, dataset, algorithm, condition, measure, effect [CI], seeds (training
    seeds behind the effect), interval, rule, verdict."""
    frame = claims_frame(study, data, choices)
    level = f"{100 * study.confidence:g}%"
    notes = [f"Each row: the effect (mean over training seeds) with its {level} confidence interval, how the "
             f"interval was made, the rule, and the verdict. held: the interval excludes 0 in the claimed "
             f"direction; not held: it excludes 0 in the other; inconclusive: neither. No-effect claims (C2, C7, "
             f"C8) hold when the interval stays within the margin (report.margins: LPF "
             f"{study.margins['lpf_relative']:.0%} of ADM's, sample quality {study.margins['fid_relative']:.0%} "
             f"of the compared model's), are not held when it lies wholly beyond it.",
             "Between training runs (different recipes, or seeds), the interval is Student-t over per-seed paired "
             "differences; with one seed the training-seed variance is unknown, and such a row is inconclusive "
             "whatever its draw-level interval (paired bootstrap over sample indices for FD and KID, t over the "
             "shared weight-noise draws for LPF) says. Variants of one run (averages, precisions) are compared on "
             "their draw-level intervals when there is one seed.",
             "FD intervals resample the samples with the reference statistics fixed (reference-set variation, "
             "common to all models, is left out); KID intervals resample both. KID is unbiased at any N; FD is "
             "biased upward at small N, so compare FD values only at equal N.",
             "fSGLD perturbs its weights in training much as the absolute LPF does, so its flatness claims (C1) rest "
             "on the filter-normalised LPF, the Hessian and the perturbation curve.",
             *choice_notes(choices), seeds_note(study)]
    flags = control_failures(frame)
    if flags:
        notes = [f"WARNING: {flag}" for flag in flags] + notes
    return Table("claims", "Claims of the paper: effects, intervals and verdicts", frame, notes)
