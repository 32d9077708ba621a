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
from pipeline.settings import METRICS, stage_settings, train_settings
from pipeline.study_files import rule_inputs

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
    dataset="|".join(map(lambda d: d.replace(".", r"\."), config["datasets"])),
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
    "kid_reference": code("kid-reference"),
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


def variant_weights(w):
    return layout.weights(RESULTS, w.dataset, w.recipe, w.seed, w.average, w.precision)


def report_inputs():
    """The study's files the report reads (pipeline/study_files.py, the list the report stage checks)."""
    return dict(**rule_inputs(stage_settings(config, "report")), code=CODE["report"])


# `snakemake --report` for a results folder without a report (most often: the overlay the run used was
# not passed): one line naming it, rather than a "Missing metadata" warning per output first.
if any(arg.startswith("--report") for arg in sys.argv) and not os.path.exists(layout.report_index_html(RESULTS)):
    raise WorkflowError(
        f"snakemake --report: {layout.report_index_html(RESULTS)} does not exist; pass the config files the run "
        f"used, e.g. snakemake --report report.html --configfile config/demo.yaml"
    )


def report_outputs():
    return layout.report_tables(RESULTS) + layout.report_figures(RESULTS) + [layout.report_index(RESULTS)]


def html_report_item(path, category):
    """`path` marked for `snakemake --report` with its caption (workflow/report/<name>.rst) and its title
    (layout.REPORT_TITLES, listed instead of the path) if the HTML report can show it inline (.html,
    .png), else left unmarked."""
    name, ext = os.path.splitext(os.path.basename(path))
    if ext not in (".html", ".png"):
        return path
    return report(
        path, caption=f"../report/{name}.rst", category=category, labels={"title": layout.REPORT_TITLES[name]}
    )
