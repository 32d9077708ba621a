"""The Snakemake workflow: lint, config errors, the whole micro DAG, stale-only reruns, resumption.

The workflow runs in a copy of the repository (code, config, workflow; no results), so tests can
edit code and config there without touching the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import h5py
import pytest

from conftest import MICRO_OVERLAYS as OVERLAYS, REPO, SNAKEMAKE, run_snakemake


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count of a dry run."""
    result = run_snakemake(workdir, "-n", "--quiet", "rules", *OVERLAYS, *args)
    out = result.stdout + result.stderr
    counts = {}
    for line in out.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) not in ("job", "total"):
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def workdir(micro_workdir) -> Path:
    return micro_workdir


def test_lint_is_clean():
    result = run_snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay, message", [
    ("trainig:\n  steps: 5\n", "(top level): unknown key(s) trainig; allowed: datasets, device"),
    ("training:\n  steps: many\n", "'many' is not of type 'integer'"),
    ("recipes:\n  sam_rho0.1:\n    sam: {rho: -0.1}\n", "-0.1 is less than the minimum of 0"),
    ("study:\n  sampling_steps: [20, 2000]\n", "study.sampling_steps [2000] exceed the 1000 diffusion steps"),
    ("study:\n  recipes: [adm, nesterov]\n", "unknown recipe 'nesterov'"),
    ("study:\n  datasets: [mnist]\n", "names 'mnist', which has no entry under datasets"),
    ("study:\n  precisions: [fp32, int3]\n", "'int3' does not match"),
    ("datasets:\n  cifar10:\n    source: /nonexistent/cifar\n", "datasets.cifar10.source = /nonexistent/cifar does not exist"),
])
def test_bad_config_gives_one_clear_message(tmp_path, overlay, message):
    """Each bad config stops the workflow before any job, with one message and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(overlay)
    result = run_snakemake(REPO, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# Job counts of the overlays' plans, derived by hand from their study lists:
# demo: 3 runs; 3 averages x (fp32 at T' 20, 100 + int8 at 20) = 9 scored variants per run; LPF and
# exposure on 3 averages, perturbation, surface and Hessian on the raw weights = 9 metric jobs per run.
# The negative control adds one ADM run (seed 100): its training, raw fp32 samples at T'=20, their FD, its LPF.
# One kid_reference job per dataset: the reference's share of every KID bootstrap.
DEMO_PLAN = {"prepare": 1, "calibration_samples": 2, "fid_calibration": 2, "fid_reference": 1, "kid_reference": 1,
             "train": 4,
             "quantize": 9, "sample": 28, "fid": 28, "sample_validation": 1, "fid_validation": 1, "metric": 28,
             "report": 1, "all": 1}
# cpu-study: ADM and SAM rho 0.1 x 3 seeds at every variant (raw and EMA in fp32 and int8, SWA in fp32: 5
# scored variants at T'=20; 9 metric jobs: LPF and exposure on 3 averages, the rest on raw weights); SAM rho
# 0.01, SGD, fSGLD, fSGLD-Adam and IP x 3 seeds on raw weights only (fp32 and int8; 5 metric jobs); three
# negative-control ADM runs (raw fp32 and LPF). rho is fixed, so no selection samples.
CPU_STUDY_PLAN = {"prepare": 1, "calibration_samples": 2, "fid_calibration": 2, "fid_reference": 1,
                  "kid_reference": 1, "train": 24,
                  "quantize": 27, "sample": 63, "fid": 63, "metric": 132, "report": 1, "all": 1}


@pytest.mark.parametrize("overlay, plan, results", [("config/demo.yaml", DEMO_PLAN, "results/demo"),
                                                    ("config/cpu-study.yaml", CPU_STUDY_PLAN, "results/cpu-study")])
def test_overlays_validate_and_plan_the_expected_jobs(overlay, plan, results):
    """The README's demo and the CPU study: schema-valid, and their plan is the study they describe."""
    # --forceall: the whole plan, whatever results the checkout already holds.
    result = subprocess.run([*SNAKEMAKE, "-n", "--forceall", "--quiet", "rules", "--configfile", overlay], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = {}
    for line in (result.stdout + result.stderr).splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) not in ("job", "total"):
            counts[match.group(1)] = int(match.group(2))
    assert counts == plan
    # Each overlay writes to its own results folder, so one cannot overwrite the other's report.
    dry = subprocess.run([*SNAKEMAKE, "-n", "--forceall", "--configfile", overlay], cwd=REPO, capture_output=True,
                         text=True)
    assert f"{results}/report/index.md" in dry.stdout + dry.stderr


def test_micro_dag_produces_every_table_and_figure(workdir):
    report = workdir / "results" / "micro" / "report"
    for name in ("table1_adm_vs_sam", "table2_fid", "table3_lpf", "table4_quantization", "rho_sweep", "claims"):
        for ext in ("csv", "md", "tex"):
            assert (report / f"{name}.{ext}").stat().st_size > 0
    for name in ("fig1_loss_surface", "fig2_samples_fp32_int8", "fig5_loss_vs_perturbation", "fig6_eps_norm"):
        for ext in ("png", "pdf"):
            assert (report / f"{name}.{ext}").stat().st_size > 0
    assert "FD-EffNetLite0" in (report / "table2_fid.md").read_text()
    assert planned_jobs(workdir) == {}, "a finished workflow plans nothing"


def test_rho_edit_reruns_exactly_that_recipe(workdir, tmp_path):
    edit = tmp_path / "rho.yaml"
    edit.write_text("recipes:\n  sam_rho0.1:\n    sam: {rho: 0.2}\n")
    jobs = planned_jobs(workdir, str(edit))
    # One run: 2 averages x 2 precisions x 1 T' variants, 2 int8 copies, LPF and exposure on both averages
    # and perturbation, surface, Hessian on the raw weights (the demo's metric_averages): 7 metric jobs;
    # and its selection samples, which choose the +SAM rho.
    assert jobs == {"train": 1, "quantize": 2, "sample": 4, "fid": 4, "metric": 7, "sample_validation": 1,
                    "fid_validation": 1, "report": 1, "all": 1}
    result = run_snakemake(workdir, "-n", *OVERLAYS, str(edit))
    assert "recipe=sam_rho0.1" in result.stdout + result.stderr
    assert "recipe=adm" not in result.stdout + result.stderr


def test_report_code_edit_reruns_only_the_report(workdir):
    tables = workdir / "pipeline" / "report" / "tables.py"
    tables.write_text(tables.read_text() + "\n# edited\n")
    assert planned_jobs(workdir) == {"report": 1, "all": 1}


def test_calibration_code_edit_reruns_only_the_calibration_rows(workdir):
    """Floor and static of the one dataset: their images, their FD, and the report."""
    stage = workdir / "pipeline" / "stages" / "calibration.py"
    original, times = stage.read_text(), stage.stat()
    stage.write_text(original + "\n# edited\n")
    try:
        assert planned_jobs(workdir) == {"calibration_samples": 2, "fid_calibration": 2, "report": 1, "all": 1}
    finally:
        # Content and mtime back: later tests of this module expect the calibration rows up to date.
        stage.write_text(original)
        os.utime(stage, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_training_code_edit_reruns_training_and_what_follows(workdir):
    optim = workdir / "pipeline" / "optim" / "sam.py"
    optim.write_text(optim.read_text() + "\n# edited\n")
    jobs = planned_jobs(workdir)
    # adm and sam_rho0.1, and the negative control's ADM run (seed 100).
    assert jobs.get("train") == 3 and "prepare" not in jobs and "fid_reference" not in jobs
    assert jobs.get("report") == 1


def test_interrupted_workflow_continues_without_redoing_finished_jobs(tmp_path, workdir):
    """Run up to training, then the rest: the second run plans no training or data job."""
    other = f"results={tmp_path / 'results'}"
    run_snakemake(workdir, "--cores", "2", *OVERLAYS, "--config", other, "--until", "train")
    jobs = planned_jobs(workdir, "--config", other)
    assert "train" not in jobs and "prepare" not in jobs
    assert jobs.get("sample", 0) > 0
    with h5py.File(tmp_path / "results" / "fashion_mnist" / "adm" / "seed0" / "train.h5") as f:
        assert f["loss"].shape[0] == 20
