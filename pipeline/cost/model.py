"""The cost model: each planned job as counts of work units, times seconds per unit.

A work unit is one thing calibration times on a device (`python -m pipeline plan --calibrate`):

* `train/<model>/b<batch>/<recipe kind>`   one training step at the dataset's global batch; the
  recipe kind is what changes the step's cost (base optimizer, +IP, +SAM's second pass, +fSGLD's
  n_pert passes), not its hyperparameters.
* `sample/<model>/b<batch>`    one reverse-diffusion step of one image (sampling, exposure bias).
* `loss/<model>/b<batch>`      the diffusion loss of one evaluation triple (LPF, perturbation, surface).
* `hvp/<model>/b<batch>`       one image's share of a Hessian-vector product.
* `extract/<extractor>/<res>px/c<channels>`  the features of one image.
* `fid_fixed/<extractor>/n<N>` what an FD job costs beyond extraction: the extractor's start,
  moments and the paired bootstrap of FD and KID on N samples (the reference's KID terms read).
* `kid_reference/<extractor>/r<rows>/b<replicates>`  the reference's KID bootstrap terms (one job).

<model> is preset, resolution and image channels. Every job also pays `startup_seconds` (the
start-up of `python -m pipeline.launch <stage>` forked by the fork server of a local run; a
cluster job, a process of its own, pays the calibration's `startup_own_process_seconds`), except
the target rule `all`, which runs nothing. Rules that only move data (prepare, calibration samples, quantize, report) are
charged the start-up alone. Hessian jobs are charged their upper bound (2 x max_iter products;
the tolerance usually stops them sooner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pipeline.config import section
from pipeline.cost.dryrun import Job
from pipeline.errors import PipelineError
from pipeline.recipes import resolve_recipe

# Rules that run no command: no start-up, no work.
TARGET_RULES = {"all"}
# Rules whose work is small next to their start-up (data copies, rounding, tables).
STARTUP_ONLY_RULES = {"prepare", "calibration_samples", "quantize", "report"}


def model_key(config: Mapping[str, Any], dataset: str) -> str:
    data = section(config, "datasets", dataset)
    return f"{data['preset']}/{int(data['resolution'])}px/c{int(section(config, 'datasets', dataset, 'channels'))}"


def recipe_kind(config: Mapping[str, Any], recipe: str) -> str:
    """What decides a training step's cost (pipeline.recipes.Recipe.step_kind)."""
    return resolve_recipe(config, recipe).step_kind


def train_key(config: Mapping[str, Any], dataset: str, recipe: str) -> str:
    batch = int(section(config, "datasets", dataset, "batch_size"))
    return f"train/{model_key(config, dataset)}/b{batch}/{recipe_kind(config, recipe)}"


def sample_key(config: Mapping[str, Any], dataset: str, batch: int) -> str:
    return f"sample/{model_key(config, dataset)}/b{int(batch)}"


def loss_key(config: Mapping[str, Any], dataset: str, batch: int) -> str:
    return f"loss/{model_key(config, dataset)}/b{int(batch)}"


def hvp_key(config: Mapping[str, Any], dataset: str, batch: int) -> str:
    return f"hvp/{model_key(config, dataset)}/b{int(batch)}"


def extract_key(config: Mapping[str, Any], dataset: str) -> str:
    extractor = section(config, "fid", "extractor")
    resolution = int(section(config, "datasets", dataset, "resolution"))
    return f"extract/{extractor}/{resolution}px/c{int(section(config, 'datasets', dataset, 'channels'))}"


def fid_fixed_key(config: Mapping[str, Any], n: int) -> str:
    return f"fid_fixed/{section(config, 'fid', 'extractor')}/n{int(n)}"


def kid_reference_key(config: Mapping[str, Any], dataset: str) -> str:
    fid = section(config, "fid")
    rows = min(reference_count(config, dataset), int(fid["kid_rows"]))
    replicates = int((fid.get("bootstrap") or {}).get("kid_replicates", 0))
    return f"kid_reference/{fid['extractor']}/r{rows}/b{replicates}"


def reference_count(config: Mapping[str, Any], dataset: str) -> int:
    chosen = section(config, "fid", "reference_images")
    if chosen is not None:
        return int(chosen)
    expected = section(config, "datasets", dataset).get("count")
    if expected is None:
        raise PipelineError(f"fid.reference_images is null and {dataset} has no fixed size; set "
                            f"fid.reference_images so the reference's cost is known.")
    return int(expected)


def metric_units(config: Mapping[str, Any], dataset: str, metric: str) -> dict[str, float]:
    """Work units of one metric job (the counts in each metric stage's `Cost:` docstring)."""
    s = section(config, "metrics", metric)
    if metric == "lpf":
        sigmas = {float(s["sigma"]), *(float(x) for x in s["sigma_sweep"])}
        evaluations = 1 + len(s["scalings"]) * len(sigmas) * int(s["draws"])
        return {loss_key(config, dataset, s["batch_size"]): evaluations * int(s["n_eval"])}
    if metric == "perturbation":
        nonzero = sum(1 for r in s["radii"] if float(r) != 0.0)
        evaluations = 1 + int(s["directions"]) * nonzero
        return {loss_key(config, dataset, s["batch_size"]): evaluations * int(s["n_eval"])}
    if metric == "surface":
        return {loss_key(config, dataset, s["batch_size"]): int(s["grid"]) ** 2 * int(s["n_eval"])}
    if metric == "hessian":
        batch = int(s["batch"])
        return {hvp_key(config, dataset, batch): 2 * int(s["max_iter"]) * batch,
                loss_key(config, dataset, batch): batch}
    if metric == "exposure":
        # Training-input and sampling-chain curves: one model call per image and chain step each.
        return {sample_key(config, dataset, s["batch_size"]): 2 * int(s["n_images"]) * sum(map(int, s["steps"]))}
    raise PipelineError(f"no cost model for metric '{metric}'.")


def _fid_units(config: Mapping[str, Any], dataset: str, n: int) -> dict[str, float]:
    return {extract_key(config, dataset): n, fid_fixed_key(config, n): 1}


def job_units(job: Job, config: Mapping[str, Any]) -> dict[str, float]:
    """The work units of one job (empty for start-up-only rules)."""
    w, rule = job.wildcards, job.rule
    if rule in TARGET_RULES or rule in STARTUP_ONLY_RULES:
        return {}
    sampling = section(config, "sampling")
    selection_n = int(section(config, "report", "selection", "n_samples"))
    if rule == "train":
        return {train_key(config, w["dataset"], w["recipe"]): int(section(config, "training", "steps"))}
    if rule in ("sample", "sample_validation"):
        n = int(sampling["n_samples"]) if rule == "sample" else selection_n
        return {sample_key(config, w["dataset"], sampling["batch_size"]): n * int(w["steps"])}
    if rule == "fid":
        return _fid_units(config, w["dataset"], int(sampling["n_samples"]))
    if rule == "fid_validation":
        return _fid_units(config, w["dataset"], selection_n)
    if rule == "fid_calibration":
        return _fid_units(config, w["dataset"], int(w["n"]))
    if rule == "fid_reference":
        return {extract_key(config, w["dataset"]): reference_count(config, w["dataset"])}
    if rule == "kid_reference":
        return {kid_reference_key(config, w["dataset"]): 1}
    if rule == "metric":
        return metric_units(config, w["dataset"], w["metric"])
    raise PipelineError(f"no cost model for rule '{rule}'; add it to pipeline/cost/model.py.")


@dataclass
class Timings:
    """Seconds (and peak memory, MB) per work unit on one device, plus per-job start-up."""

    startup_seconds: float
    seconds: dict[str, float]
    peak_mb: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_calibration(cls, calibration: Mapping[str, Any]) -> "Timings":
        units = calibration["units"]
        return cls(float(calibration["startup_seconds"]),
                   {key: float(u["seconds"]) for key, u in units.items()},
                   {key: float(u["peak_mb"]) for key, u in units.items() if u.get("peak_mb") is not None})


@dataclass
class RuleCost:
    rule: str
    jobs: int = 0
    seconds: float = 0.0
    longest_seconds: float = 0.0
    runtime_minutes: float | None = None   # the rule's `runtime` resource (longest job's budget)
    mem_mb: float | None = None            # the rule's `mem_mb` resource
    peak_mb: float | None = None           # the largest measured peak of its work units


def required_units(jobs: Iterable[Job], config: Mapping[str, Any]) -> set[str]:
    """Every work unit the jobs need timed."""
    keys: set[str] = set()
    for job in jobs:
        keys.update(job_units(job, config))
    return keys


def job_seconds(job: Job, config: Mapping[str, Any], timings: Timings) -> float:
    if job.rule in TARGET_RULES:
        return 0.0
    units = job_units(job, config)
    missing = sorted(set(units) - set(timings.seconds))
    if missing:
        raise PipelineError(f"the calibration has no timing for {', '.join(missing)}; rerun "
                            f"`python -m pipeline plan --calibrate` with the same config files.")
    return timings.startup_seconds + sum(count * timings.seconds[key] for key, count in units.items())


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def estimate(jobs: Iterable[Job], config: Mapping[str, Any], timings: Timings) -> list[RuleCost]:
    """Device-seconds per rule, the longest job of each, and its budget, in first-seen rule order."""
    by_rule: dict[str, RuleCost] = {}
    for job in jobs:
        if job.rule in TARGET_RULES:
            continue
        cost = by_rule.setdefault(job.rule, RuleCost(job.rule))
        seconds = job_seconds(job, config, timings)
        cost.jobs += 1
        cost.seconds += seconds
        cost.longest_seconds = max(cost.longest_seconds, seconds)
        runtime, mem = _number(job.resources.get("runtime")), _number(job.resources.get("mem_mb"))
        if runtime is not None:
            cost.runtime_minutes = runtime if cost.runtime_minutes is None else min(cost.runtime_minutes, runtime)
        if mem is not None:
            cost.mem_mb = mem if cost.mem_mb is None else min(cost.mem_mb, mem)
        peaks = [timings.peak_mb[key] for key in job_units(job, config) if key in timings.peak_mb]
        if peaks:
            cost.peak_mb = max(peaks + ([cost.peak_mb] if cost.peak_mb is not None else []))
    return list(by_rule.values())


def total_seconds(costs: Iterable[RuleCost]) -> float:
    return math.fsum(c.seconds for c in costs)

