"""Resolved settings of each stage: pure functions of the config and the wildcards.

The Snakefile passes these (as JSON) to the stages, so Snakemake's params trigger reruns exactly
when a job's own settings change: editing SAM's rho changes only the SAM runs' settings. The
stages call the same functions when run by hand with --config. No torch import here, so the
Snakefile stays quick to parse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import read_yaml, section, validation_problems
from pipeline.errors import PipelineError
from pipeline.nn.preset_table import PRESET_TABLE
from pipeline.precision import CLIP, parse_precision, precision_scheme
from pipeline.recipes import resolve_recipe


def model_settings(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """What is needed to rebuild a dataset's network and diffusion from a weights file."""
    data = section(config, "datasets", dataset)
    return {"dataset": dataset, "preset": data["preset"], "resolution": int(data["resolution"]),
            "diffusion": dict(section(config, "training", "diffusion")),
            "device": config.get("device", "auto")}


def train_settings(config: Mapping[str, Any], dataset: str, recipe: str, seed: int) -> dict[str, Any]:
    """The resolved settings of one training run."""
    data = section(config, "datasets", dataset)
    training = section(config, "training")
    return {
        **model_settings(config, dataset),
        "seed": int(seed),
        "batch_size": int(data["batch_size"]),
        "random_flip": bool(data["random_flip"]),
        "steps": int(training["steps"]),
        "log_every": int(training["log_every"]),
        "checkpoint_every": int(training["checkpoint_every"]),
        "schedule_sampler": training["schedule_sampler"],
        "ema": dict(training["ema"]),
        "swa": dict(training["swa"]),
        "cuda": dict(training.get("cuda", {})),
        "recipe": resolve_recipe(config, recipe).describe(),
    }


METRICS = ("lpf", "perturbation", "surface", "hessian", "exposure")


def study_precisions(study: Mapping[str, Any], average: str) -> list[str]:
    """The precisions evaluated for one average: study.precisions, then its extra_precisions."""
    extra = (study.get("extra_precisions") or {}).get(average, [])
    return list(study["precisions"]) + [p for p in extra if p not in study["precisions"]]


def study_steps(study: Mapping[str, Any], precision: str) -> list[int]:
    """The T' a precision is sampled at: every sampling step for fp32, quantized_steps otherwise."""
    steps = [int(s) for s in study["sampling_steps"]]
    if precision == "fp32" or study.get("quantized_steps") is None:
        return steps
    return [int(s) for s in study["quantized_steps"]]


def metric_averages(study: Mapping[str, Any], metric: str) -> list[str]:
    """The averages a metric is measured on: study.metric_averages[metric], else every average."""
    chosen = (study.get("metric_averages") or {}).get(metric)
    return [a for a in study["averages"] if chosen is None or a in chosen]


def study_variants(study: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """Every (average, precision, T') a training run of the study is sampled and scored at."""
    return [(average, precision, steps)
            for average in study["averages"]
            for precision in study_precisions(study, average)
            for steps in study_steps(study, precision)]


def stage_settings(config: Mapping[str, Any], stage: str, dataset: str | None = None,
                   precision: str | None = None) -> dict[str, Any]:
    """The config slice a stage depends on (and nothing more, so unrelated edits rerun nothing).

    quantize needs `precision`: only clip-and-round reads the config (quantization.clip), so a
    clip edit reruns the intBclip jobs and leaves the min-max ones (and their samples) alone.
    """
    if stage == "quantize":
        if precision_scheme(parse_precision(precision)) == CLIP:
            return {"quantization": {"clip": float(section(config, "quantization", "clip"))}}
        return {}
    if stage == "prepare":
        return {"dataset": dataset, **dict(section(config, "datasets", dataset))}
    if stage == "fid":
        return dict(section(config, "fid"))
    if stage == "fid_reference":
        # The bootstrap is drawn in the fid stage only: changing it must not recompute the reference.
        return {k: v for k, v in section(config, "fid").items() if k != "bootstrap"}
    if stage in ("calibration_floor", "calibration_static"):
        # The floor of a dataset without a test split avoids the reference's subset; noise
        # depends on N and the seed only.
        sampling = section(config, "sampling")
        settings = {"n": sampling["n_samples"], "seed": sampling["seed"]}
        if stage == "calibration_floor":
            settings["reference_images"] = section(config, "fid")["reference_images"]
        return settings
    if stage == "sample":
        return {**model_settings(config, dataset), **dict(section(config, "sampling"))}
    if stage in METRICS:
        # A config slice: the metric stages read it exactly like a merged config file.
        return {"device": config.get("device", "auto"),
                "datasets": {dataset: {"preset": section(config, "datasets", dataset, "preset")}},
                "training": {"diffusion": dict(section(config, "training", "diffusion"))},
                "metrics": {stage: dict(section(config, "metrics", stage))}}
    if stage == "report":
        study = section(config, "study")
        return {"results": config["results"], "study": dict(study), "report": dict(section(config, "report")),
                "extractor": section(config, "fid", "extractor"),
                # N of the calibration rows' file names (floor and static use the models' N).
                "n_samples": section(config, "sampling", "n_samples"),
                "recipes": {name: resolve_recipe(config, name).describe() for name in study["recipes"]},
                "averages_from_training": {"ema_decay": section(config, "training", "ema", "decay"),
                                           "swa": dict(section(config, "training", "swa"))}}
    raise ValueError(f"no settings for stage {stage!r}")


def planning_problems(config: Mapping[str, Any], configfiles: Sequence[str | Path]) -> list[str]:
    """Everything checked before Snakemake plans a job, one line per problem.

    `configfiles`: the files Snakemake merged (workflow.configfiles), re-read with the loader
    that refuses duplicate keys. Cross-checks run only on a schema-valid config (they rely on
    its shape).
    """
    problems = []
    for path in configfiles:
        try:
            read_yaml(path)
        except PipelineError as err:
            problems.append(str(err))
    problems += validation_problems(config, complete=True)
    return problems or config_problems(config)


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What a JSON schema cannot check: cross references, paths on disk, step counts."""
    problems = []
    # Any other character is safe: the rules quote every path in their shell commands.
    if "{" in config["results"] or "}" in config["results"]:
        problems.append(f"results = {config['results']!r}: Snakemake reads braces in a path as wildcards; "
                        f"name a folder without {{ }}")
    study = config["study"]
    for name in study["datasets"]:
        if name not in config["datasets"]:
            problems.append(f"study.datasets names '{name}', which has no entry under datasets:")
            continue
        source = config["datasets"][name]["source"]
        if source is not None and not Path(source).exists():
            problems.append(f"datasets.{name}.source = {source} does not exist; point it at the "
                            f"raw data or set it to null for the default location.")
        preset, resolution = config["datasets"][name]["preset"], config["datasets"][name]["resolution"]
        if PRESET_TABLE[preset]["image_size"] != resolution:
            problems.append(f"datasets.{name}: preset {preset} is built for {PRESET_TABLE[preset]['image_size']}px "
                            f"images but resolution is {resolution}; pick a preset of that size or change it.")
        processes = config["training"].get("processes", 1)
        if config["datasets"][name]["batch_size"] % processes:
            problems.append(f"datasets.{name}.batch_size = {config['datasets'][name]['batch_size']} is not a "
                            f"multiple of training.processes = {processes}; each process takes an equal share.")
    training = config["training"]
    if round(training["swa"]["start_fraction"] * training["steps"]) < 1:
        problems.append(f"training.swa.start_fraction = {training['swa']['start_fraction']} of {training['steps']} "
                        f"steps starts SWA at step 0, averaging in the untrained weights; raise either.")
    for name in study["recipes"]:
        try:
            resolve_recipe(config, name)
        except PipelineError as err:
            problems.append(str(err))
    for average in study.get("extra_precisions") or {}:
        if average not in study["averages"]:
            problems.append(f"study.extra_precisions names average '{average}', which is not in study.averages "
                            f"{study['averages']}.")
    for metric, averages in (study.get("metric_averages") or {}).items():
        unknown = sorted(set(averages) - set(study["averages"]))
        if unknown:
            problems.append(f"study.metric_averages.{metric} names {unknown}, not in study.averages {study['averages']}.")
    control = config["report"]["negative_control"]
    if control["seeds"] and control["recipe"] not in study["recipes"]:
        problems.append(f"report.negative_control.recipe = {control['recipe']} is not in study.recipes; name a "
                        f"recipe of the study or set report.negative_control.seeds to [].")
    overlap = sorted(set(control["seeds"]) & set(study["seeds"]))
    if overlap:
        problems.append(f"report.negative_control.seeds {overlap} are also study seeds; the control needs runs "
                        f"the study does not have (e.g. 100, 101, ...).")
    stray = sorted(set(study.get("quantized_steps") or []) - set(study["sampling_steps"]))
    if stray:
        problems.append(f"study.quantized_steps {stray} are not in study.sampling_steps {study['sampling_steps']}; "
                        f"quantized variants are sampled at a subset of those T'.")
    diffusion_steps = config["training"]["diffusion"]["steps"]
    for key, steps in (("study.sampling_steps", study["sampling_steps"]),
                       ("metrics.exposure.steps", config["metrics"]["exposure"].get("steps", []))):
        too_many = [s for s in steps if s > diffusion_steps]
        if too_many:
            problems.append(f"{key} {too_many} exceed the {diffusion_steps} diffusion steps the "
                            f"models are trained with (training.diffusion.steps); T' must be <= that.")
    weights = config["fid"]["inception_weights"]
    if weights is not None and not Path(weights).is_file():
        problems.append(f"fid.inception_weights = {weights} is not a file.")
    selection = config["report"]["sam_selection"]
    sam_recipes = [r for r in study["recipes"] if (config["recipes"].get(r) or {}).get("sam") is not None]
    if selection.startswith("best_fid_") and int(selection.removeprefix("best_fid_")) not in study["sampling_steps"]:
        problems.append(f"report.sam_selection = {selection}, but T' = {selection.removeprefix('best_fid_')} "
                        f"is not in study.sampling_steps {study['sampling_steps']}.")
    if selection.startswith("rho="):
        rho = float(selection.removeprefix("rho="))
        if not any(float(config["recipes"][r]["sam"]["rho"]) == rho for r in sam_recipes):
            problems.append(f"report.sam_selection = {selection}, but no recipe of the study uses that rho.")
    return problems
