"""The study as the report sees it: which recipes, how rows are named, which rho fills +SAM.

Everything here is a pure function of the report settings (`stage_settings(config, "report")`)
and, for the rho selection, of the collected FID values; no file is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.recipes import KINDS, Recipe, recipe_from_description
from pipeline.settings import (RAW, metric_averages, study_precisions, study_recipes, study_runs, study_seeds,
                               study_steps, study_variants)

AVERAGE_SUFFIX = {"none": "", "ema": "+EMA", "swa": "+SWA"}
# How Tables 3 and 5 of the paper head their average columns.
AVERAGE_HEADING = {"none": "w/o", "ema": "+EMA", "swa": "+SWA"}


def algorithm_label(recipe_label: str, average: str) -> str:
    """A table row's name: the recipe's label plus the average ("ADM" + ema -> "+EMA").

    A parenthesised remark stays last: "+fSGLD (Adam base, ext.)" + swa -> "+fSGLD+SWA (Adam base, ext.)".
    """
    suffix = AVERAGE_SUFFIX[average]
    if not suffix:
        return recipe_label
    if recipe_label == "ADM":
        return suffix
    head, sep, remark = recipe_label.partition(" (")
    return f"{head}{suffix}{sep}{remark}"


@dataclasses.dataclass(frozen=True)
class SamChoice:
    """The SAM recipe that fills the rows of one SAM label on one dataset."""

    dataset: str
    label: str
    recipe: str
    rho: float
    reason: str

    def sentence(self) -> str:
        return f"{self.label} uses rho={self.rho:g} (recipe {self.recipe}; {self.reason})"


@dataclasses.dataclass
class Study:
    """The report's view of `stage_settings(config, "report")`."""

    settings: dict[str, Any]

    @property
    def results(self) -> str:
        return str(self.settings["results"])

    @property
    def datasets(self) -> list[str]:
        return list(self.settings["study"]["datasets"])

    @property
    def seeds(self) -> list[int]:
        """Every training seed (study.seeds and study.extra_seeds), ascending; a recipe or variant may have
        fewer (seeds_of), and every comparison uses the seeds both sides have."""
        return study_seeds(self.settings["study"])

    @property
    def full_seeds(self) -> list[int]:
        """study.seeds: the seeds of study.recipes scored at every variant."""
        return [int(s) for s in self.settings["study"]["seeds"]]

    def seeds_of(self, recipe: str, average: str = RAW) -> list[int]:
        """The seeds `recipe` was trained with and scored on at `average`."""
        return [run.seed for run in study_runs(self.settings["study"])
                if run.recipe == recipe and (average == RAW or not run.raw_only)]

    def averages_of(self, recipe: str) -> list[str]:
        """The averages `recipe` has runs scored at (only the raw weights for a recipe of study.extra_seeds alone)."""
        return [average for average in self.averages if self.seeds_of(recipe, average)]

    @property
    def extra_seeds(self) -> dict[str, list[int]]:
        return {r: [int(s) for s in seeds] for r, seeds in (self.settings["study"].get("extra_seeds") or {}).items()}

    @property
    def averages(self) -> list[str]:
        return list(self.settings["study"]["averages"])

    @property
    def precisions(self) -> list[str]:
        """Every precision of the study, those of one average only (extra_precisions) included."""
        names: list[str] = []
        for average in self.averages:
            names += [p for p in study_precisions(self.settings["study"], average) if p not in names]
        return names

    def metric_averages(self, metric: str) -> list[str]:
        """The averages `metric` is measured on."""
        return metric_averages(self.settings["study"], metric)

    def precisions_for(self, average: str) -> list[str]:
        return study_precisions(self.settings["study"], average)

    def steps_for(self, precision: str) -> list[int]:
        return sorted(study_steps(self.settings["study"], precision))

    def variants(self) -> list[tuple[str, str, int]]:
        """(average, precision, T') of every scored variant of a run."""
        return study_variants(self.settings["study"])

    def scored(self, average: str, precision: str, steps: int) -> bool:
        return (average, precision, steps) in self.variants()

    @property
    def quantized_precisions(self) -> list[str]:
        return [p for p in self.precisions if p != "fp32"]

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.settings["study"]["sampling_steps"])

    @property
    def metrics(self) -> list[str]:
        return list(self.settings["study"]["metrics"])

    @property
    def extractor(self) -> str:
        return str(self.settings["extractor"])

    @property
    def n_samples(self) -> int:
        """N of every sample set, and so of the calibration floor and static sets."""
        return int(self.settings["n_samples"])

    @property
    def show_paper_numbers(self) -> bool:
        return bool(self.settings["report"]["show_paper_numbers"])

    @property
    def sam_selection(self) -> str:
        return str(self.settings["report"]["sam_selection"])

    @property
    def selection_steps(self) -> int | None:
        """The T' whose selection samples choose SAM's rho (None when rho is fixed)."""
        rule = self.sam_selection
        return int(rule.removeprefix("best_fid_")) if rule.startswith("best_fid_") else None

    @property
    def negative_control_recipe(self) -> str:
        return str(self.settings["report"]["negative_control"]["recipe"])

    @property
    def negative_control_seeds(self) -> list[int]:
        """Seeds of the control's runs, paired in order with study.seeds."""
        return [int(s) for s in self.settings["report"]["negative_control"]["seeds"]]

    @property
    def confidence(self) -> float:
        return float(self.settings["report"]["confidence"])

    @property
    def power_target_seeds(self) -> int:
        """The seed count at which the power table also gives the minimum detectable effect."""
        return int(self.settings["report"]["power"]["target_seeds"])

    @property
    def margins(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.settings["report"]["margins"].items()}

    def describe(self, recipe: str) -> dict[str, Any]:
        return self.settings["recipes"][recipe]

    def recipe(self, name: str) -> Recipe:
        """The recipe itself, which knows its kind, base and label."""
        return recipe_from_description(self.describe(name))

    def label(self, recipe: str) -> str:
        return str(self.describe(recipe)["label"])

    @property
    def recipes(self) -> list[str]:
        """Every recipe of the study in the paper's row order (pipeline.recipes.KINDS; stable within a kind)."""
        names = study_recipes(self.settings["study"])
        return sorted(names, key=lambda name: KINDS.index(self.recipe(name).kind))

    @property
    def sam_recipes(self) -> list[str]:
        return [r for r in self.recipes if self.recipe(r).kind == "sam"]

    @property
    def fsgld_recipes(self) -> list[str]:
        return [r for r in self.recipes if self.recipe(r).kind == "fsgld"]

    def sam_groups(self) -> dict[str, list[str]]:
        """SAM recipes by label ("+SAM", "+ASAM", "+IP+SAM"): each label is one rho grid."""
        groups: dict[str, list[str]] = {}
        for recipe in self.sam_recipes:
            groups.setdefault(self.label(recipe), []).append(recipe)
        return groups

    def rho(self, recipe: str) -> float:
        return float(self.describe(recipe)["sam"]["rho"])

    @property
    def baseline(self) -> str | None:
        """The plain ADM recipe the claims compare against (the first recipe labelled "ADM")."""
        return next((r for r in self.recipes if self.label(r) == "ADM"), None)

    def base_of(self, recipe: str) -> str | None:
        """The recipe `recipe` is compared with: the first one without IP, SAM or fSGLD that trains with
        the same base optimizer and learning rate (ADM for the Adam recipes, SGD for SGD-base fSGLD)."""
        base = self.recipe(recipe).base
        return next((r for r in self.recipes if self.recipe(r).is_plain and self.recipe(r).base == base), None)

    def table_recipes(self, choices: Mapping[str, Mapping[str, SamChoice]], dataset: str) -> list[str]:
        """Rows of Tables 1-4 on `dataset`: every non-SAM recipe, and each SAM label's chosen rho."""
        chosen = {c.recipe for c in choices.get(dataset, {}).values()}
        return [r for r in self.recipes if self.recipe(r).kind != "sam" or r in chosen]


def select_sam(study: Study, fid: pd.DataFrame, metric_name: str) -> dict[str, dict[str, SamChoice]]:
    """The SAM recipe of each (dataset, SAM label) named by `report.sam_selection`.

    "best_fid_<T'>": the lowest mean-over-seeds metric of the raw fp32 weights at T' on the
    selection samples (drawn with report.selection.sampling_seed, never the samples the claims
    test); ties go to the recipe listed first in the study. "rho=<value>": the recipe with that rho.
    `fid` holds one row per selection FID file (columns dataset, recipe, seed, steps, value).

    :return: {dataset: {label: SamChoice}}.
    """
    rule = study.sam_selection
    choices: dict[str, dict[str, SamChoice]] = {}
    for dataset in study.datasets:
        choices[dataset] = {}
        for label, group in study.sam_groups().items():
            grid = ", ".join(f"{study.rho(r):g}" for r in group)
            if rule.startswith("rho="):
                wanted = float(rule.removeprefix("rho="))
                matching = [r for r in group if study.rho(r) == wanted]
                if not matching:
                    raise PipelineError(f"report.sam_selection = {rule}, but no {label} recipe of the study "
                                        f"has that rho (grid: {grid}).")
                recipe = matching[0]
                reason = f"fixed by report.sam_selection = {rule}; grid {{{grid}}}"
            elif rule.startswith("best_fid_"):
                steps = int(rule.removeprefix("best_fid_"))
                means = _raw_fp32_means(study, fid, dataset, group, steps, rule)
                recipe = min(group, key=lambda r: (means[r], group.index(r)))
                reason = (f"lowest {metric_name} of the raw fp32 weights at T'={steps} among rho in "
                          f"{{{grid}}}, on selection samples of their own (sampling seed "
                          f"{study.settings['report']['selection']['sampling_seed']}), not on those the claims test")
            else:
                raise PipelineError(f"report.sam_selection = {rule!r} is neither best_fid_<T'> nor rho=<value>.")
            choices[dataset][label] = SamChoice(dataset, label, recipe, study.rho(recipe), reason)
    return choices


def _raw_fp32_means(study: Study, fid: pd.DataFrame, dataset: str, group: Sequence[str], steps: int,
                    rule: str) -> dict[str, float]:
    if steps not in study.steps or "fp32" not in study.precisions or "none" not in study.averages:
        raise PipelineError(f"report.sam_selection = {rule} needs T'={steps} in study.sampling_steps, fp32 in "
                            f"study.precisions and none in study.averages; set it to rho=<value> otherwise.")
    rows = fid[(fid.dataset == dataset) & (fid.steps == steps)]
    means = rows.groupby("recipe")["value"].mean()
    return {r: float(means[r]) for r in group}
