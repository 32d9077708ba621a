# Helpers shared by the rules: config checks that a schema cannot express, wildcard constraints,
# the source files each stage depends on (so a code change reruns exactly its stage and what
# follows), and the resolved settings each job receives.

import os
import sys
from pathlib import Path

import yaml

from pipeline import layout
from pipeline.precision import PRECISION_REGEX, QUANTIZED_REGEX
from pipeline.cli import STAGES
from pipeline.codedeps import source_files
from pipeline.settings import METRICS, metric_averages, stage_settings, study_variants, train_settings

# Jobs run `python -m pipeline ...`: put the interpreter that runs Snakemake (the venv's) first
# on PATH, here and in every job Snakemake spawns, locally or on a cluster node.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
# Every rule's command is `f"{PIPELINE}<stage> ..."`: the launcher runs the stage through this
# machine's fork server when the run is local (no import tax per job), in its own process otherwise.
PIPELINE = "OMP_NUM_THREADS={threads} python -m pipeline.launch "
RESULTS = config["results"]
STUDY = config["study"]
EXTRACTOR = config["fid"]["extractor"]
# Data-parallel processes per training run, one GPU each: the train rule's `gpu` resource.
TRAIN_PROCESSES = config["training"].get("processes", 1)
# CPU threads per training process: the train rule's threads are this times the processes.
TRAIN_THREADS = config["training"].get("threads_per_process", 2)


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    recipe="|".join(map(lambda r: r.replace(".", r"\."), config["recipes"])),
    seed=r"\d+",
    average="none|ema|swa",
    precision=PRECISION_REGEX,
    steps=r"\d+",
    extractor="inception|effnet-lite0(-[0-9]+px)?",
    metric="lpf|perturbation|surface|hessian|exposure",
    kind="|".join(layout.CALIBRATION_KINDS),
    n=r"\d+",


def code(stage):
    """Source files behind a stage, as inputs: editing them makes that stage's outputs stale."""
    return source_files(STAGES[stage], root=Path(workflow.basedir) / "pipeline")


# Science code per rule, traced from each stage's imports (pipeline/codedeps.py); shared plumbing
# (cli, io, config, settings, layout) is left out there, so that a logging or error-message edit
# does not rerun the study. Each metric has its own entry: editing lpf.py reruns only LPF jobs.
CODE = {
    "prepare": code("prepare"),
    "fid_reference": code("fid-reference"),
    "calibration_samples": code("calibration-samples"),
    "train": code("train"),
    "quantize": code("quantize"),
    "sample": code("sample"),
    "fid": code("fid"),
    **{metric: code(metric) for metric in METRICS},
    "report": code("report"),
}


def as_settings(value):
    """Settings as one YAML flow mapping, `{batch_size: 8, lr: 0.0001, ...}`: it reads well among the
    Snakemake report's job parameters, and rules pass it as {params.settings:q}, which shell-quotes any
    character. The stage parses it back exactly (float reprs round-trip)."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=True).strip()


def all_runs():
    for dataset in STUDY["datasets"]:
        for recipe in STUDY["recipes"]:
            for seed in STUDY["seeds"]:
                yield dict(dataset=dataset, recipe=recipe, seed=seed)


def all_scored():
    """Every (run, average, precision, T') that is sampled and scored."""
    for run in all_runs():
        for average, precision, steps in study_variants(STUDY):
            yield dict(run, average=average, precision=precision), steps


def variant_weights(w):
    return layout.weights(RESULTS, w.dataset, w.recipe, w.seed, w.average, w.precision)


def report_inputs():
    fids, metrics, logs, samples = [], [], [], []
    validation = []
    selection = config["report"]["sam_selection"]
    if selection.startswith("best_fid_"):
        steps = int(selection.removeprefix("best_fid_"))
        for run in all_runs():
            if (config["recipes"].get(run["recipe"]) or {}).get("sam") is not None:
                validation.append(layout.validation_fid(RESULTS, *run.values(), steps, EXTRACTOR))
    for v, steps in all_scored():
        fids.append(layout.fid(RESULTS, *v.values(), steps, EXTRACTOR))
        samples.append(layout.samples(RESULTS, *v.values(), steps))
    # The negative control: the same recipe with other seeds, raw fp32 at the smallest T', and LPF.
    control = config["report"]["negative_control"]
    for dataset in STUDY["datasets"]:
        for seed in control["seeds"]:
            run = dict(dataset=dataset, recipe=control["recipe"], seed=seed)
            fids.append(layout.fid(RESULTS, *run.values(), "none", "fp32", min(STUDY["sampling_steps"]), EXTRACTOR))
            logs.append(layout.train_log(RESULTS, *run.values()))
            if "lpf" in STUDY["metrics"]:
                metrics.append(layout.metric(RESULTS, *run.values(), "none", "lpf"))
    for run in all_runs():
        logs.append(layout.train_log(RESULTS, *run.values()))
        for name in STUDY["metrics"]:
            for average in metric_averages(STUDY, name):
                metrics.append(layout.metric(RESULTS, *run.values(), average, name))
    # Floor and static FD of every dataset, with the models' N: the reading scale of the FID rows.
    calibration = [
        layout.calibration_fid(RESULTS, dataset, kind, config["sampling"]["n_samples"], EXTRACTOR)
        for dataset in STUDY["datasets"]
        for kind in layout.CALIBRATION_KINDS
    ]
    return dict(
        fid=fids,
        validation=validation,
        metrics=metrics,
        logs=logs,
        samples=samples,
        calibration=calibration,
        code=CODE["report"],
    )


def report_outputs():
    return layout.report_tables(RESULTS) + layout.report_figures(RESULTS) + [layout.report_index(RESULTS)]


def html_report_item(path, category):
    """`path` marked for `snakemake --report` with its caption (workflow/report/<name>.rst) if the HTML
    report can show it inline (.html, .png), else left unmarked."""
    name, ext = os.path.splitext(os.path.basename(path))
    if ext not in (".html", ".png"):
        return path
    return report(path, caption=f"../report/{name}.rst", category=category)
