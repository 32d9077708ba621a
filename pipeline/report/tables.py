"""The paper's tables (1-5) from the collected scalars, one function per table, plus the rho sweep.

Each function returns a render.Table whose cells are strings: FID-like values with 2 decimals,
LPF and Hessian values with 4 significant digits, and "mean ± std" (sample std over seeds)
whenever the study has several seeds. Rows are per dataset: ADM, +IP, the chosen +SAM, then the
fSGLD recipes (this project's extension), each with its averages where the table has them.
Columns of a metric the study does not measure are left out; the paper's own numbers get
"paper ..." columns only where `paper.py` allows the comparison.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.report import paper
from pipeline.report.collect import Collected
from pipeline.report.render import Table
from pipeline.report.study import AVERAGE_HEADING, SamChoice, Study, algorithm_label

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
    return f"Cells are mean ± sample std (ddof 1) over training seeds {', '.join(map(str, seeds))}."


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

def table1(study: Study, data: Collected, choices: Choices) -> Table:
    name, raw, base = data.metric_name, raw_average(study), _base_precision(study)
    quantized = _quantized_with_fp32(study)
    gap_steps = exposure_steps(data) if has_metric(study, data, "exposure") else None
    show_paper_fid = _fid_comparable_anywhere(study, name, paper.TABLE4_INT8) and "int8" in quantized
    show_paper_gap = study.show_paper_numbers and any(d in paper.TABLE1_GAP for d in study.datasets)
    show_paper_lpf = study.show_paper_numbers and any(d in paper.LPF for d in study.datasets)
    rows = []
    for dataset in study.datasets:
        chosen = [c.recipe for c in choices.get(dataset, {}).values()]
        recipes = [r for r in [study.baseline, *chosen, *study.fsgld_recipes] if r is not None]
        for recipe in recipes:
            algorithm = algorithm_label(study.label(recipe), raw)
            key = {"dataset": dataset, "recipe": recipe, "average": raw}
            row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
            comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
            for steps in study.steps:
                before = seed_values(data.fid, "value", **key, precision=base, steps=steps)
                for precision in quantized:
                    after = seed_values(data.fid, "value", **key, precision=precision, steps=steps)
                    row[f"{name} {base} → {precision} (T'={steps})"] = (
                        f"{fixed(before)} → {fixed(after)} ({fixed(after - before, signed=True)})")
                if not quantized:
                    row[f"{name} {base} (T'={steps})"] = fixed(before)
                if show_paper_fid:
                    numbers = paper.paper_int8(dataset, algorithm, steps) if comparable else None
                    row[f"paper FID fp32 → int8 (T'={steps})"] = (
                        "" if numbers is None else f"{numbers[0]:.2f} → {numbers[1]:.2f} ({numbers[2]:+.2f})")
            if gap_steps is not None:
                gap = seed_values(data.exposure, "gap_l2_mean", **key, steps=gap_steps)
                row[f"eps-norm gap (L2, mean over T'={gap_steps})"] = fixed(gap, signed=True)
                if show_paper_gap:
                    row["paper eps-norm gap"] = paper_number(paper.paper_gap(dataset, algorithm), signed=True)
            if has_metric(study, data, "lpf"):
                row["LPF"] = significant(seed_values(data.lpf, "lpf", **key))
                if show_paper_lpf:
                    row["paper LPF"] = paper_number(paper.paper_lpf(dataset, algorithm), decimals=3)
            if has_metric(study, data, "hessian"):
                row["Hessian top eigenvalue"] = significant(seed_values(data.hessian, "top_eigenvalue", **key))
                row["Hessian trace"] = significant(seed_values(data.hessian, "trace", **key))
            rows.append(row)
    notes = [metric_note(name), *choice_notes(choices), seeds_note(study),
             f"Weights: {weights_name(raw)}; '→' shows {base} → quantized with the change in brackets."]
    if gap_steps is not None:
        notes.append(f"eps-norm gap: mean over the T'={gap_steps} sampling steps of the sampling-minus-"
                     f"training mean L2 norm of the predicted eps (not squared); the paper does not say "
                     f"how it aggregates its gap.")
    if show_paper_fid:
        notes.append(f"Paper FID: Table 4 of the paper (its Table 1 repeats T'=20); {paper.TABLE4_NOTE}.")
    if show_paper_gap or show_paper_lpf:
        notes.append("Paper eps-norm gap and LPF: Table 1 of the paper (CIFAR-10), whose gap aggregation, LPF "
                     "sigma and draws are not stated.")
    return Table("table1_adm_vs_sam", f"Table 1: ADM vs +SAM ({name}, eps-norm gap, flatness)",
                 pd.DataFrame(rows), notes)


# ------------------------------------------------------------------------------------------
# Table 2: the metric of every algorithm x dataset x T'.

def table2(study: Study, data: Collected, choices: Choices) -> Table:
    name, base = data.metric_name, _base_precision(study)
    show_paper = _fid_comparable_anywhere(study, name, paper.TABLE2_FID)
    rows = []
    for dataset in study.datasets:
        comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
        for recipe in study.table_recipes(choices, dataset):
            for average in study.averages:
                algorithm = algorithm_label(study.label(recipe), average)
                row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
                for steps in study.steps:
                    row[f"{name} (T'={steps})"] = fixed(seed_values(
                        data.fid, "value", dataset=dataset, recipe=recipe, average=average, precision=base,
                        steps=steps))
                    if show_paper:
                        value = paper.paper_fid(dataset, algorithm, steps) if comparable else None
                        row[f"paper FID (T'={steps})"] = paper_number(value)
                rows.append(row)
    notes = [metric_note(name), f"Weights in {base}; DDPM ancestral sampling with T' respaced steps.",
             *choice_notes(choices), seeds_note(study)]
    if show_paper:
        notes.append("Paper columns: Table 2 of the paper.")
    return Table("table2_fid", f"Table 2: {name} of every algorithm (dataset x T')", pd.DataFrame(rows), notes)


# ------------------------------------------------------------------------------------------
# Tables 3 and 5: LPF by recipe x average, with Hessian columns where measured.

def table3(study: Study, data: Collected, choices: Choices) -> Table:
    with_lpf, with_hessian = has_metric(study, data, "lpf"), has_metric(study, data, "hessian")
    rows = []
    for dataset in study.datasets:
        show_paper = study.show_paper_numbers and dataset in paper.LPF
        for recipe in study.table_recipes(choices, dataset):
            label = study.label(recipe)
            row = {"dataset": dataset, "algorithm": label, "recipe": recipe}
            keys = {a: {"dataset": dataset, "recipe": recipe, "average": a} for a in study.averages}
            # Grouped by measure, then by average, as the paper's Tables 3 and 5 lay out LPF.
            for average in study.averages if with_lpf else ():
                heading = AVERAGE_HEADING[average]
                row[f"LPF {heading}"] = significant(seed_values(data.lpf, "lpf", **keys[average]))
                if study.show_paper_numbers and any(d in paper.LPF for d in study.datasets):
                    value = paper.paper_lpf(dataset, algorithm_label(label, average)) if show_paper else None
                    row[f"paper LPF {heading}"] = paper_number(value, decimals=3)
            for column, title in (("top_eigenvalue", "Hessian top eigenvalue"), ("trace", "Hessian trace")):
                for average in study.averages if with_hessian else ():
                    row[f"{title} {AVERAGE_HEADING[average]}"] = significant(
                        seed_values(data.hessian, column, **keys[average]))
            rows.append(row)
    notes = [*choice_notes(choices), seeds_note(study)]
    if with_lpf:
        sigma = sorted(set(data.lpf["sigma"].tolist()))
        notes.insert(0, f"LPF: training loss averaged over i.i.d. N(0, sigma^2) weight noise, sigma = "
                        f"{', '.join(f'{s:g}' for s in sigma)} (lower is flatter).")
        if study.show_paper_numbers and any(d in paper.LPF for d in study.datasets):
            sources = ", ".join(f"{d}: {paper.LPF_SOURCE[d]}" for d in study.datasets if d in paper.LPF)
            notes.append(f"Paper columns: {sources} of the paper, whose sigma and draws are not stated.")
    if with_hessian:
        notes.append("Hessian: largest-magnitude eigenvalue (power iteration) and trace (Hutchinson) of the "
                     "training loss on a fixed batch.")
    if not (with_lpf or with_hessian):
        notes.insert(0, "Neither lpf nor hessian is in study.metrics, so this table has no measurements.")
    return Table("table3_lpf", "Tables 3 and 5: flatness by recipe and average", pd.DataFrame(rows), notes)


# ------------------------------------------------------------------------------------------
# Table 4: the metric before and after weight quantization.

def table4(study: Study, data: Collected, choices: Choices) -> Table:
    name = data.metric_name
    quantized = _quantized_with_fp32(study)
    show_paper = _fid_comparable_anywhere(study, name, paper.TABLE4_INT8) and "int8" in quantized
    rows = []
    for dataset in study.datasets:
        comparable = paper.fid_comparable(study.show_paper_numbers, dataset, name)
        for recipe in study.table_recipes(choices, dataset):
            for average in study.averages:
                algorithm = algorithm_label(study.label(recipe), average)
                key = {"dataset": dataset, "recipe": recipe, "average": average}
                row = {"dataset": dataset, "algorithm": algorithm, "recipe": recipe}
                for steps in study.steps if quantized else ():
                    before = seed_values(data.fid, "value", **key, precision="fp32", steps=steps)
                    row[f"{name} fp32 (T'={steps})"] = fixed(before)
                    for precision in quantized:
                        after = seed_values(data.fid, "value", **key, precision=precision, steps=steps)
                        row[f"{name} {precision} (T'={steps})"] = fixed(after)
                        # Paired per seed: each seed's quantized model against its own fp32 weights.
                        row[f"{name} change {precision} (T'={steps})"] = fixed(after - before, signed=True)
                    if show_paper:
                        numbers = paper.paper_int8(dataset, algorithm, steps) if comparable else None
                        fp32, int8, change = numbers if numbers else (None, None, None)
                        row[f"paper FID fp32 (T'={steps})"] = paper_number(fp32)
                        row[f"paper FID int8 (T'={steps})"] = paper_number(int8)
                        row[f"paper FID change int8 (T'={steps})"] = paper_number(change, signed=True)
                rows.append(row)
    notes = [metric_note(name), *choice_notes(choices), seeds_note(study)]
    if not quantized:
        notes.insert(0, "The study has no fp32 / quantized pair of precisions, so no change can be shown.")
    if show_paper:
        notes.append(f"Paper columns: Table 4 of the paper (CIFAR-10 only); {paper.TABLE4_NOTE}.")
    return Table("table4_quantization", f"Table 4: {name} under post-training weight quantization",
                 pd.DataFrame(rows), notes)


# ------------------------------------------------------------------------------------------
# The rho sweep: every SAM recipe of the grid, raw fp32 weights, and which one the tables use.

def rho_sweep(study: Study, data: Collected, choices: Choices) -> Table:
    name, raw, base = data.metric_name, raw_average(study), _base_precision(study)
    with_lpf = has_metric(study, data, "lpf")
    rows = []

    def row_of(dataset: str, algorithm: str, rho: str, recipe: str, selected: str) -> dict[str, str]:
        key = {"dataset": dataset, "recipe": recipe, "average": raw}
        row = {"dataset": dataset, "algorithm": algorithm, "rho": rho, "recipe": recipe, "selected": selected}
        for steps in study.steps:
            row[f"{name} (T'={steps})"] = fixed(seed_values(data.fid, "value", **key, precision=base, steps=steps))
        if with_lpf:
            row["LPF"] = significant(seed_values(data.lpf, "lpf", **key))
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
             f"Selection rule: report.sam_selection = {study.sam_selection}.", seeds_note(study)]
    if not study.sam_groups():
        notes.insert(0, "The study has no SAM recipe, so there is no rho to sweep.")
    measures = f"{name} and LPF" if with_lpf else name
    return Table("rho_sweep", f"SAM rho sweep: {measures} for every rho of the grid", pd.DataFrame(rows), notes)


TABLE_BUILDERS: tuple[Callable[[Study, Collected, Choices], Table], ...] = (table1, table2, table3, table4, rho_sweep)
