"""Every file the study produces that the report reads: one list, for the report rule and the report.

`report_inputs(settings)` takes the report's settings (`stage_settings(config, "report")`) and
returns one Input per file, each with the kind of job that makes it. The report rule
(workflow/rules/common.smk) lists these paths as its inputs, and the report stage
(pipeline/report/collect.py) reads them, so the two cannot list different files. Paths come
from pipeline.layout. Light imports only: the Snakefile imports this module at parse time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

from pipeline import layout
from pipeline.settings import RAW, Run, metric_averages, study_runs, study_variants

# The rule (workflow/rules/*.smk) and command behind each kind of input.
MAKER = {
    "fid": "rule fid (python -m pipeline fid)",
    "validation": "rule fid_validation (python -m pipeline fid)",
    "metric": "rule metric (python -m pipeline {name})",
    "train": "rule train (python -m pipeline train)",
    "sample": "rule sample (python -m pipeline sample)",
    "calibration": "rule fid_calibration (python -m pipeline fid, on rule calibration_samples' images)",
}
# The report rule's input names, one per kind (samples: Fig. 2 reads some of them).
RULE_INPUTS = {"fid": "fid", "validation": "validation", "metric": "metrics", "train": "logs", "sample": "samples",
               "calibration": "calibration"}


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    kind: str
    key: dict[str, Any]
    name: str = ""

    @property
    def maker(self) -> str:
        return MAKER[self.kind].format(name=self.name)


def _runs(settings: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], Run]]:
    """(the run's wildcards, the run) for every training run of the study (study.extra_seeds included)."""
    study = settings["study"]
    for dataset in study["datasets"]:
        for run in study_runs(study):
            yield {"dataset": dataset, "recipe": run.recipe, "seed": run.seed}, run


def _scored(settings: Mapping[str, Any]) -> list[Input]:
    """FID and samples of every run's scored (average, precision, T')."""
    results, extractor = settings["results"], settings["extractor"]
    inputs = []
    for run, kind in _runs(settings):
        for average, precision, steps in study_variants(settings["study"], raw_only=kind.raw_only):
            key = {**run, "average": average, "precision": precision, "steps": steps}
            inputs.append(Input(layout.fid(results, *run.values(), average, precision, steps, extractor), "fid", key))
            inputs.append(Input(layout.samples(results, *run.values(), average, precision, steps), "sample", key))
    return inputs


def _validation(settings: Mapping[str, Any]) -> list[Input]:
    """FID of the selection samples of every SAM run (they choose rho; report.sam_selection best_fid_T')."""
    selection = str(settings["report"]["sam_selection"])
    if not selection.startswith("best_fid_"):
        return []
    steps = int(selection.removeprefix("best_fid_"))
    return [Input(layout.validation_fid(settings["results"], *run.values(), steps, settings["extractor"]),
                  "validation", {**run, "average": "none", "precision": "fp32", "steps": steps})
            for run, _ in _runs(settings) if settings["recipes"][run["recipe"]].get("sam") is not None]


def _logs_and_metrics(settings: Mapping[str, Any]) -> list[Input]:
    results, study = settings["results"], settings["study"]
    inputs = []
    for run, kind in _runs(settings):
        inputs.append(Input(layout.train_log(results, *run.values()), "train", dict(run)))
        for name in study["metrics"]:
            for average in metric_averages(study, name):
                if kind.raw_only and average != RAW:
                    continue
                inputs.append(Input(layout.metric(results, *run.values(), average, name), "metric",
                                    {**run, "average": average}, name))
    return inputs


def _calibration(settings: Mapping[str, Any]) -> list[Input]:
    """Floor and static FD of every dataset, with the models' N: the reading scale of the FID rows."""
    n = int(settings["n_samples"])
    return [Input(layout.calibration_fid(settings["results"], dataset, kind, n, settings["extractor"]),
                  "calibration", {"dataset": dataset, "kind": kind, "n": n})
            for dataset in settings["study"]["datasets"] for kind in layout.CALIBRATION_KINDS]


def _negative_control(settings: Mapping[str, Any]) -> list[Input]:
    """The control recipe with other seeds: raw fp32 FID at the smallest T', its log, and LPF."""
    results, study, control = settings["results"], settings["study"], settings["report"]["negative_control"]
    recipe, steps = control["recipe"], min(int(s) for s in study["sampling_steps"])
    inputs = []
    for dataset in study["datasets"]:
        for seed in control["seeds"]:
            run = {"dataset": dataset, "recipe": recipe, "seed": int(seed)}
            inputs.append(Input(layout.fid(results, dataset, recipe, seed, "none", "fp32", steps, settings["extractor"]),
                                "fid", {**run, "average": "none", "precision": "fp32", "steps": steps}))
            inputs.append(Input(layout.train_log(results, dataset, recipe, seed), "train", dict(run)))
            if "lpf" in study["metrics"]:
                inputs.append(Input(layout.metric(results, dataset, recipe, seed, "none", "lpf"), "metric",
                                    {**run, "average": "none"}, "lpf"))
    return inputs


def report_inputs(settings: Mapping[str, Any]) -> list[Input]:
    """Every file the report rule takes as input, in the rule's order."""
    return (_scored(settings) + _validation(settings) + _logs_and_metrics(settings) + _calibration(settings)
            + _negative_control(settings))


def rule_inputs(settings: Mapping[str, Any]) -> dict[str, list[str]]:
    """report_inputs(settings) as the report rule's named input lists (fid, validation, metrics, ...)."""
    named: dict[str, list[str]] = {name: [] for name in RULE_INPUTS.values()}
    for item in report_inputs(settings):
        named[RULE_INPUTS[item.kind]].append(item.path)
    return named
