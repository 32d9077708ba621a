"""Fixtures shared by test modules: the micro workflow, run once per session in a copy of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
MICRO_OVERLAYS = ["--configfile", "config/demo.yaml", "config/micro.yaml", "config/micro-complete.yaml"]
# The cluster test's micro overlay, widened so that every table and figure has its inputs.
MICRO_COMPLETE = """
study:
  precisions: [fp32, int8]
  metrics: [lpf, perturbation, surface, hessian, exposure]
metrics:
  perturbation: {radii: [0, 4], directions: 2, n_eval: 16, batch_size: 16}
  surface: {grid: 3, n_eval: 8, batch_size: 8}
  hessian: {batch: 8, max_iter: 2}
  exposure: {n_images: 4, steps: [20], batch_size: 4}
report:
  negative_control: {recipe: adm, seeds: [100]}
"""


# Tests that take the `torch_device` fixture run once per device: on the CPU, and on CUDA (marked
# `cuda`, so `pytest -m cuda` selects them) where torch sees a GPU.
CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA_SKIP])]


@pytest.fixture(params=DEVICES)
def torch_device(request) -> torch.device:
    if request.param == "cuda":
        # The numerics every pipeline process that takes a GPU runs under (process-wide switches).
        from pipeline.device import use_exact_cuda_numerics

        use_exact_cuda_numerics()
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Test-sized tensors gain nothing from a second thread, and on a shared machine an OpenMP
    thread waiting for a descheduled partner costs more than it gives. A module takes it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory) -> Path:
    """A copy of the repository without results, with the micro DAG already run once.

    Shared by the workflow tests and the HTML report tests (the DAG is the slow part); tests that
    edit code or config there restore what they change or work on a copy.
    """
    root = tmp_path_factory.mktemp("repo")
    for name in ("Snakefile", "config.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("config", "workflow", "pipeline", "profiles"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "config" / "micro-complete.yaml").write_text(MICRO_COMPLETE)
    run_snakemake(root, "--cores", "2", *MICRO_OVERLAYS)
    return root
