"""The paper's tables (1-5) from the collected scalars, one function per table, plus the rho sweep.

Each function returns a render.Table whose cells are strings "value [low, high]" (effects.value_cell,
4 significant digits): the interval is Student-t over seeds when the study has several, else
draw-level (bootstrap, Monte-Carlo draws, standard error); changes are signed (Effect.cell).
Rows are per dataset: ADM, +IP, the chosen +SAM, then the fSGLD recipes (this project's
extension), each with its averages where the table has them.
Columns of a metric the study does not measure are left out; the paper's own numbers get
"paper ..." columns only where `paper.py` allows the comparison.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.report import paper
from pipeline.report.collect import Collected
from pipeline.precision import parse_precision
from pipeline.report.effects import (calibration_reading, difference, effect, exposure_arm, fd_arm, hessian_arm,
                                     identity, kid_arm, lpf_arm, value_cell)
from pipeline.report.render import Table
from pipeline.report.study import SamChoice, Study, algorithm_label

Choices = Mapping[str, Mapping[str, SamChoice]]


# ------------------------------------------------------------------------------------------
# Cell formatting.

def fixed(values: Sequence[float], decimals: int = 2, signed: bool = False) -> str:
    """"3.83" for one value, "3.83 ± 0.12" for several (sample std), "" for none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return ""
    sign = "+" if signed else ""
    text = f"{values.mean():{sign}.{decimals}f}"
    return text if values.size == 1 else f"{text} ± {values.std(ddof=1):.{decimals}f}"


def significant(values: Sequence[float], digits: int = 4) -> str:
    """"0.06312" for one value, "0.06312 ± 0.0012" for several, "" for none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return ""
    text = f"{values.mean():.{digits}g}"
    return text if values.size == 1 else f"{text} ± {values.std(ddof=1):.2g}"


def paper_number(value: float | None, decimals: int = 2, signed: bool = False) -> str:
    return "" if value is None else f"{value:{'+' if signed else ''}.{decimals}f}"


def seed_values(frame: pd.DataFrame | None, column: str, **key: Any) -> np.ndarray:
    """`column` of the rows matching `key`, ordered by seed (one value per seed)."""
    if frame is None:
        return np.zeros(0)
    mask = np.ones(len(frame), dtype=bool)
    for name, value in key.items():
        mask &= (frame[name] == value).to_numpy()
    return frame.loc[mask].sort_values("seed")[column].to_numpy(dtype=np.float64)


def seeds_note(study: Study) -> str:
    seeds = study.seeds
    if len(seeds) == 1:
        return f"One training seed ({seeds[0]})."
    # Cells are no longer mean ± std: each effect is the mean of its per-seed values with a t interval.
    note = (f"Training seeds {', '.join(map(str, seeds))}: each effect is the mean of its per-seed values, "
            f"its interval Student-t over them.")
    if study.extra_seeds:
        extra = "; ".join(f"{study.label(r)} ({r}) {', '.join(map(str, s))}" for r, s in study.extra_seeds.items())
        note += (f" Every recipe of study.recipes has seeds {', '.join(map(str, study.full_seeds))} at every variant; "
                 f"raw weights only (study.extra_seeds): {extra}. A comparison uses the seeds both sides have "
                 f"(the claims' seeds column).")
    return note


def metric_note(metric_name: str) -> str:
    if metric_name == "FID":
        return "FID: Fréchet distance in Inception-v3 pool features (lower is better)."
    network = "EfficientNet-Lite0" if metric_name == "FD-EffNetLite0" else "another network than Inception-v3"
    return (f"{metric_name}: Fréchet distance in {network} features (lower is better); it is not FID and is "
            f"never compared with the paper's FIDs.")


def choice_notes(choices: Choices) -> list[str]:
    return [f"{dataset}: {choice.sentence()}." for dataset, by_label in choices.items()
            for choice in by_label.values()]


def raw_average(study: Study) -> str:
    return "none" if "none" in study.averages else study.averages[0]


def weights_name(average: str) -> str:
    """How text names an average's weights: "raw" for none."""
    return "raw" if average == "none" else average.upper()


def _base_precision(study: Study) -> str:
    return "fp32" if "fp32" in study.precisions else study.precisions[0]


def _quantized_with_fp32(study: Study) -> list[str]:
    """The quantized precisions, when fp32 is there to compare them with (else none)."""
    return study.quantized_precisions if "fp32" in study.precisions else []


def _fid_comparable_anywhere(study: Study, metric_name: str, table: Mapping[str, Any]) -> bool:
    return any(paper.fid_comparable(study.show_paper_numbers, d, metric_name) and d in table
               for d in study.datasets)


def has_metric(study: Study, data: Collected, metric: str) -> bool:
    return metric in study.metrics and getattr(data, metric, None) is not None


def exposure_steps(data: Collected) -> int | None:
    """The T' whose gap Table 1 shows: the smallest one the exposure files hold."""
    return None if data.exposure is None else int(data.exposure["steps"].min())


# ------------------------------------------------------------------------------------------
# Table 1: ADM vs +SAM (and fSGLD): FID fp32 -> int8, eps-norm gap, LPF (Hessian when measured).

def _value(study: Study, arm) -> str:
    """One model's value with its interval (over seeds, or draw-level with one seed)."""
    return value_cell(effect([arm], identity, study.seeds, study.confidence, between_runs=False))


def _change(study: Study, after, before) -> str:
    """A change within one run (e.g. fp32 -> int8), paired per seed and per bootstrap replicate."""
    eff = effect([after, before], difference, study.seeds, study.confidence, between_runs=False)
    return "" if eff is None else eff.cell()


def interval_note(study: Study) -> str:
    level = f"{100 * study.confidence:g}%"
    if len(study.seeds) > 1:
        over = (f"the training seeds each model has ({', '.join(map(str, study.seeds))} in all)" if study.extra_seeds
                else f"training seeds {', '.join(map(str, study.seeds))}")
        return (f"Cells: mean over {over} [{level} t interval of the mean over seeds]; changes are paired per "
                f"seed.")
    return (f"Cells: value [{level} draw-level interval: bootstrap over sample indices for FD and KID, centred on the "
            f"value, t over Monte-Carlo draws for LPF, over images for the eps-norm gap]. One training seed: these "
            f"intervals leave out the seed-to-seed variation, which is larger.")


def _hessian_cell(study: Study, data: Collected, dataset: str, recipe: str, average: str, column: str) -> str:
    cell = _value(study, hessian_arm(data, dataset, recipe, average, column))
    rows = data.hessian[(data.hessian.dataset == dataset) & (data.hessian.recipe == recipe)
                        & (data.hessian.average == average)]
    flag = {"top_eigenvalue": "eigenvalue_converged", "trace": "trace_converged"}[column]
    return f"{cell} †" if cell and not bool(rows[flag].all()) else cell


HESSIAN_NOTE = ("Hessian: largest-magnitude eigenvalue (power iteration) and trace (Hutchinson, interval from its "
                "probes) of the training loss on a fixed batch; † marks an estimate that stopped at "
                "metrics.hessian.max_iter before reaching its tolerance.")


def table1(study: Study, data: Collected, choices: Choices) -> Table:
    name, raw, base = data.metric_name, raw_average(study), _base_precision(study)
    gap_steps = exposure_steps(data) if has_metric(study, data, "exposure") else None
    show_paper_fid = _fid_comparable_anywhere(study, name, paper.TABLE4_INT8) and "int8" in study.precisions_for(raw)
    show_paper_gap = study.show_paper_numbers and any(d in paper.TABLE1_GAP for d in study.datasets)
    show_paper_lpf = study.show_paper_numbers and any(d in paper.LPF for d in study.datasets)
    quantized = [p for p in study.precisions_for(raw) if p != "fp32"][:1] if base == "fp32" else []
    rows = []
    for dataset in study.datasets:
        chosen = [c.recipe for c in choices.get(dataset, {}).values()]
        bases = [study.base_of(r) for r in study.fsgld_recipes]
        recipes = []
        for recipe in [study.baseline, *chosen, *bases, *study.fsgld_recipes]:
            if recipe is not None and recipe not in recipes:
                recipes.append(recipe)
        for recipe in recipes:
            algorithm = algorithm_label(study.label(recipe), raw)
            row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
            comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
            for steps in study.steps_for(base):
                before = fd_arm(data, dataset, recipe, raw, base, steps)
                row[f"{name} {base} (T'={steps})"] = _value(study, before)
                for precision in [p for p in quantized if steps in study.steps_for(p)]:
                    row[f"{name} change {base} → {precision} (T'={steps})"] = _change(
                        study, fd_arm(data, dataset, recipe, raw, precision, steps), before)
                if show_paper_fid:
                    numbers = paper.paper_int8(dataset, algorithm, steps) if comparable else None
                    row[f"paper FID fp32 → int8 (T'={steps})"] = (
                        "" if numbers is None else f"{numbers[0]:.2f} → {numbers[1]:.2f} ({numbers[2]:+.2f})")
            if gap_steps is not None:
                row[f"eps-norm gap (L2, mean over T'={gap_steps})"] = _value(
                    study, exposure_arm(data, dataset, recipe, raw, gap_steps))
                if show_paper_gap:
                    row["paper eps-norm gap"] = paper_number(paper.paper_gap(dataset, algorithm), signed=True)
            if has_metric(study, data, "lpf"):
                for scaling in _scalings(data):
                    row[f"LPF {scaling}"] = _lpf_cell(study, data, dataset, recipe, raw, scaling)
                if show_paper_lpf:
                    row["paper LPF"] = paper_number(paper.paper_lpf(dataset, algorithm), decimals=3)
            if has_metric(study, data, "hessian"):
                row["Hessian top eigenvalue"] = _hessian_cell(study, data, dataset, recipe, raw, "top_eigenvalue")
                row["Hessian trace"] = _hessian_cell(study, data, dataset, recipe, raw, "trace")
            rows.append(row)
    notes = [metric_note(name), interval_note(study), *choice_notes(choices),
             f"Weights: {weights_name(raw)}; 'change' is the quantized value minus the {base} one, paired."]
    if gap_steps is not None:
        notes.append(f"eps-norm gap: mean over the T'={gap_steps} sampling steps of the sampling-minus-"
                     f"training mean L2 norm of the predicted eps (not squared); the paper does not say "
                     f"how it aggregates its gap.")
    if has_metric(study, data, "lpf"):
        notes.append(lpf_note(study, data))
    if has_metric(study, data, "hessian"):
        notes.append(HESSIAN_NOTE)
    if show_paper_fid:
        notes.append(f"Paper FID: Table 4 of the paper (its Table 1 repeats T'=20); {paper.TABLE4_NOTE}.")
    if show_paper_gap or show_paper_lpf:
        notes.append("Paper eps-norm gap and LPF: Table 1 of the paper (CIFAR-10), whose gap aggregation, LPF "
                     "sigma and draws are not stated.")
    return Table("table1_adm_vs_sam", f"Table 1: ADM vs +SAM ({name}, eps-norm gap, flatness)",
                 pd.DataFrame(rows), notes)


def _scalings(data: Collected) -> list[str]:
    return sorted(set(data.lpf["scaling"]), key=lambda s: s != "absolute")


def _lpf_cell(study: Study, data: Collected, dataset: str, recipe: str, average: str, scaling: str,
              sigma: float | None = None) -> str:
    cell = _value(study, lpf_arm(data, dataset, recipe, average, scaling, sigma))
    # fSGLD trains on the loss under Gaussian weight noise: the absolute LPF is its own objective.
    if cell and scaling == "absolute" and study.recipe(recipe).kind == "fsgld":
        cell += " §"
    return cell


def lpf_note(study: Study, data: Collected) -> str:
    main = float(data.lpf.loc[data.lpf["main"], "sigma"].iloc[0])
    return (f"LPF: training loss averaged over Gaussian weight noise (lower is flatter), at sigma = {main:g} unless "
            f"a column names another. absolute: i.i.d. N(0, sigma^2) on every parameter; filter: each filter's "
            f"noise scaled by that filter's norm (Bisla et al.'s measure, invariant to rescaling a filter before a "
            f"normalisation). § marks fSGLD's absolute LPF: fSGLD trains on the loss under this very noise, so "
            f"there it measures its own objective, not flatness. LPF - loss: LPF minus the unperturbed loss at the "
            f"main sigma, how much the loss rises under the noise (a higher base loss alone raises LPF, not this).")


# ------------------------------------------------------------------------------------------
# Table 2: the metric of every algorithm x dataset x T'.

CALIBRATION_ROWS = {"floor": "real test images (floor)", "static": "static noise (ceiling)"}


def table2(study: Study, data: Collected, choices: Choices) -> Table:
    name, base = data.metric_name, _base_precision(study)
    show_paper = _fid_comparable_anywhere(study, name, paper.TABLE2_FID)
    rows = []
    for dataset in study.datasets:
        comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
        scale = {kind: calibration_reading(data, dataset, kind, "value") for kind in CALIBRATION_ROWS}
        for recipe in study.table_recipes(choices, dataset):
            for average in study.averages_of(recipe):
                algorithm = algorithm_label(study.label(recipe), average)
                row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
                for steps in study.steps_for(base):
                    arm = fd_arm(data, dataset, recipe, average, base, steps)
                    row[f"{name} (T'={steps})"] = _value(study, arm)
                    row[f"KID (T'={steps})"] = _value(study, kid_arm(data, dataset, recipe, average, base, steps))
                    row[f"floor → static position (T'={steps})"] = _position(study, arm, scale)
                    if show_paper:
                        value = paper.paper_fid(dataset, algorithm, steps) if comparable else None
                        row[f"paper FID (T'={steps})"] = paper_number(value)
                rows.append(row)
        for kind, label in CALIBRATION_ROWS.items():
            if scale[kind] is None:
                continue
            row = {"dataset": dataset, "algorithm": label, "recipe": ""}
            for steps in study.steps_for(base):
                for column, measure in (("value", name), ("kid_value", "KID")):
                    reading = calibration_reading(data, dataset, kind, column)
                    row[f"{measure} (T'={steps})"] = value_cell(
                        effect([lambda seed, r=reading: r], identity, [0], study.confidence, between_runs=False))
                row[f"floor → static position (T'={steps})"] = "0.00" if kind == "floor" else "1.00"
            rows.append(row)
    notes = [metric_note(name), KID_NOTE, interval_note(study),
             f"Weights in {base}; DDPM ancestral sampling with T' respaced steps.",
             "Calibration rows, with the models' N: the floor is the dataset's held-out real images (its test "
             "split) against the same reference, the ceiling is Gaussian noise mapped to pixels. The position "
             "column is (value - floor) / (static - floor): 0 is as good as real images, 1 as bad as noise.",
             *choice_notes(choices)]
    if show_paper:
        notes.append("Paper columns: Table 2 of the paper.")
    return Table("table2_fid", f"Table 2: {name} and KID of every algorithm (dataset x T'), with real-image and "
                               f"noise calibration", pd.DataFrame(rows), notes)


def _position(study: Study, arm, scale) -> str:
    """Mean over seeds of (value - floor) / (static - floor), "" without both calibration rows."""
    if scale["floor"] is None or scale["static"] is None:
        return ""
    values = [r.value for r in (arm(seed) for seed in study.seeds) if r is not None]
    if not values:
        return ""
    floor, static = scale["floor"].value, scale["static"].value
    return f"{(np.mean(values) - floor) / (static - floor):.2f}"


KID_NOTE = ("KID: unbiased squared MMD with the cubic polynomial kernel in the same features (lower is better); "
            "unlike FD it has no small-sample bias, so it can be compared across sample sizes.")


# ------------------------------------------------------------------------------------------
# Tables 3 and 5: LPF (both scalings, every sigma) by recipe and average, with the Hessian.

def table3(study: Study, data: Collected, choices: Choices) -> Table:
    with_lpf, with_hessian = has_metric(study, data, "lpf"), has_metric(study, data, "hessian")
    sigmas = sorted(set(data.lpf["sigma"].tolist())) if with_lpf else []
    rows = []
    for dataset in study.datasets:
        show_paper = study.show_paper_numbers and dataset in paper.LPF
        for recipe in study.table_recipes(choices, dataset):
            for average in study.averages_of(recipe):
                algorithm = algorithm_label(study.label(recipe), average)
                row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
                for scaling in _scalings(data) if with_lpf else ():
                    for sigma in sigmas:
                        row[f"LPF {scaling} σ={sigma:g}"] = _lpf_cell(study, data, dataset, recipe, average, scaling,
                                                                      sigma)
                for scaling in _scalings(data) if with_lpf else ():
                    row[f"LPF - loss {scaling}"] = _value(study, lpf_arm(data, dataset, recipe, average, scaling,
                                                                         increase=True))
                if with_lpf and study.show_paper_numbers and any(d in paper.LPF for d in study.datasets):
                    value = paper.paper_lpf(dataset, algorithm) if show_paper else None
                    row["paper LPF"] = paper_number(value, decimals=3)
                if with_hessian:
                    row["Hessian top eigenvalue"] = _hessian_cell(study, data, dataset, recipe, average,
                                                                  "top_eigenvalue")
                    row["Hessian trace"] = _hessian_cell(study, data, dataset, recipe, average, "trace")
                rows.append(row)
    notes = [interval_note(study), *choice_notes(choices)]
    if with_lpf:
        notes.insert(0, lpf_note(study, data))
        if study.show_paper_numbers and any(d in paper.LPF for d in study.datasets):
            sources = ", ".join(f"{d}: {paper.LPF_SOURCE[d]}" for d in study.datasets if d in paper.LPF)
            notes.append(f"Paper column: {sources} of the paper, whose sigma and draws are not stated.")
    if with_hessian:
        notes.append(HESSIAN_NOTE)
    if not (with_lpf or with_hessian):
        notes.insert(0, "Neither lpf nor hessian is in study.metrics, so this table has no measurements.")
    return Table("table3_lpf", "Tables 3 and 5: flatness by recipe and average", pd.DataFrame(rows), notes)


# ------------------------------------------------------------------------------------------
# Table 4: the metric before and after weight quantization.

def table4(study: Study, data: Collected, choices: Choices) -> Table:
    name = data.metric_name
    schemes = sorted({quantization_scheme(p) for a in study.averages for p in study.precisions_for(a) if p != "fp32"})
    show_paper = _fid_comparable_anywhere(study, name, paper.TABLE4_INT8) and "int8" in study.precisions
    rows = []
    for dataset in study.datasets:
        comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
        for recipe in study.table_recipes(choices, dataset):
            for average in study.averages_of(recipe):
                quantized = [p for p in study.precisions_for(average) if p != "fp32"]
                if "fp32" not in study.precisions_for(average) or not quantized:
                    continue
                algorithm = algorithm_label(study.label(recipe), average)
                row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
                for precision in quantized:
                    for steps in study.steps_for(precision):
                        for measure, arm_of in ((name, fd_arm), ("KID", kid_arm)):
                            before = arm_of(data, dataset, recipe, average, "fp32", steps)
                            after = arm_of(data, dataset, recipe, average, precision, steps)
                            row[f"{measure} fp32 (T'={steps})"] = _value(study, before)
                            row[f"{measure} {precision} (T'={steps})"] = _value(study, after)
                            row[f"{measure} change {precision} (T'={steps})"] = _change(study, after, before)
                    if show_paper and precision == "int8":
                        for steps in study.steps_for(precision):
                            numbers = paper.paper_int8(dataset, algorithm, steps) if comparable else None
                            fp32, int8, change = numbers if numbers else (None, None, None)
                            row[f"paper FID change int8 (T'={steps})"] = paper_number(change, signed=True)
                rows.append(row)
    notes = [metric_note(name), KID_NOTE, interval_note(study), *choice_notes(choices),
             "Changes are the quantized value minus the fp32 one of the same weights, paired per seed and per "
             "bootstrap replicate (the same x_T for both)."]
    if not rows:
        notes.insert(0, "The study has no fp32 / quantized pair of precisions, so no change can be shown.")
    if show_paper:
        notes.append(f"Paper columns: Table 4 of the paper (CIFAR-10 only); {paper.TABLE4_NOTE}.")
    scheme_text = " and ".join(schemes) if schemes else "none"
    return Table("table4_quantization", f"Table 4: {name} and KID under post-training weight quantization "
                                        f"(scheme: {scheme_text})", pd.DataFrame(rows), notes)


def quantization_scheme(precision: str) -> str:
    """How a precision name quantizes, as Table 4's header says it."""
    settings = parse_precision(precision)
    if settings is None:
        return "none"
    if settings.get("scheme") == "clip":
        return "clip-and-round to [-c, c], every tensor"
    kind = "per-channel" if settings["granularity"] == "per_channel" else "per-tensor"
    return f"{kind} {'symmetric' if settings['symmetric'] else 'asymmetric'} min-max, weights of >= 2 dims"


# ------------------------------------------------------------------------------------------
# The rho sweep: every SAM recipe of the grid, raw fp32 weights, and which one the tables use.

def rho_sweep(study: Study, data: Collected, choices: Choices) -> Table:
    name, raw, base = data.metric_name, raw_average(study), _base_precision(study)
    with_lpf = has_metric(study, data, "lpf")
    rows = []

    def row_of(dataset: str, algorithm: str, rho: str, recipe: str, selected: str) -> dict[str, str]:
        row = {"dataset": dataset, "algorithm": algorithm, "rho": rho, "recipe": recipe, "selected": selected}
        for steps in study.steps_for(base):
            row[f"{name} (T'={steps})"] = _value(study, fd_arm(data, dataset, recipe, raw, base, steps))
        for scaling in _scalings(data) if with_lpf else ():
            row[f"LPF {scaling}"] = _lpf_cell(study, data, dataset, recipe, raw, scaling)
        return row

    for dataset in study.datasets:
        # SAM at rho = 0 is the base optimizer: ADM is the sweep's origin.
        if study.baseline is not None:
            rows.append(row_of(dataset, "ADM", "0", study.baseline, ""))
        for label, group in study.sam_groups().items():
            chosen = choices[dataset][label].recipe
            for recipe in sorted(group, key=study.rho, reverse=True):
                rows.append(row_of(dataset, label, f"{study.rho(recipe):g}", recipe,
                                   "yes" if recipe == chosen else ""))
    notes = [metric_note(name), f"Weights: {weights_name(raw)}, {base}.", *choice_notes(choices),
             f"Selection rule: report.sam_selection = {study.sam_selection}.", interval_note(study)]
    if not study.sam_groups():
        notes.insert(0, "The study has no SAM recipe, so there is no rho to sweep.")
    measures = f"{name} and LPF" if with_lpf else name
    return Table("rho_sweep", f"SAM rho sweep: {measures} for every rho of the grid", pd.DataFrame(rows), notes)


TABLE_BUILDERS: tuple[Callable[[Study, Collected, Choices], Table], ...] = (table1, table2, table3, table4, rho_sweep)
