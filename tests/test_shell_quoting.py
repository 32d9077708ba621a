"""Paths reach the stages intact through the rules' shell commands, whatever characters they hold.

A results folder and a dataset source whose names hold a space, a single quote, a semicolon and a
`#` are planned with `snakemake -n` and then used by real jobs (prepare and fid_reference of the
micro overlay): the outputs must land in that folder, and the `touch` hidden after the semicolon
must never run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[1]
RAW_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Unquoted, each of these would split the argument, end the command, or start a comment.
HOSTILE = "it's a; touch INJECTED #x"
OVERLAYS = ("config/demo.yaml", "config/micro.yaml")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"snakemake {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def hostile_workdir(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the workflow whose results folder and Fashion-MNIST source have hostile names."""
    if not RAW_FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (.ci/install installs it)")
    root = tmp_path_factory.mktemp("quoting")
    workdir = root / "repo"
    workdir.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, workdir / name)
    for name in ("config", "workflow", "pipeline"):
        shutil.copytree(REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
    source = root / f"raw {HOSTILE}"
    source.mkdir()
    for raw in RAW_FASHION_MNIST.iterdir():
        (source / raw.name).symlink_to(raw)
    results = f"results/{HOSTILE}"
    # JSON is YAML: the overlay carries both strings exactly, whatever they hold.
    (workdir / "config" / "hostile.yaml").write_text(
        f"results: {json.dumps(results)}\n"
        f"datasets:\n  fashion_mnist:\n    source: {json.dumps(str(source))}\n")
    return workdir, workdir / results


def test_plan_keeps_hostile_paths_whole(hostile_workdir):
    workdir, results = hostile_workdir
    dry = snakemake(workdir, "-n", "--forceall", "--printshellcmds", "--configfile", *OVERLAYS, "config/hostile.yaml")
    out = dry.stdout + dry.stderr
    # Every path is one shell word: single-quoted, with the quote inside spelled '"'"'.
    quoted_data = "'results/it'\"'\"'s a; touch INJECTED #x/fashion_mnist/data.h5'"
    assert f"--out {quoted_data}" in out
    assert f"--data {quoted_data}" in out
    # The source path travels inside prepare's settings (a YAML flow mapping, where the quote is
    # doubled), itself one shell word.
    assert "--settings '{" in out and "raw it'\"'\"''\"'\"'s a; touch INJECTED #x" in out
    assert "INJECTED" not in os.listdir(workdir)


def test_jobs_write_only_into_the_hostile_results_folder(hostile_workdir):
    workdir, results = hostile_workdir
    before = set(os.listdir(workdir))
    # fid_reference pulls in prepare: two real jobs, about a minute on two cores.
    snakemake(workdir, "--cores", "2", "--configfile", *OVERLAYS, "config/hostile.yaml", "--until", "fid_reference")
    data = results / "fashion_mnist" / "data.h5"
    reference = results / "fashion_mnist" / "fid_ref_effnet-lite0-32px.h5"
    with h5py.File(data) as f:
        assert f["images"].shape[0] == 60000
    assert reference.stat().st_size > 0
    assert (results / "logs" / "prepare" / "fashion_mnist.log").is_file()
    assert (results / "logs" / "fid_reference" / "fashion_mnist_effnet-lite0-32px.log").is_file()
    # Nothing but the results folder and Snakemake's own state appeared, and the injected touch never ran.
    assert set(os.listdir(workdir)) - before <= {"results", ".snakemake"}
    assert os.listdir(workdir / "results") == [HOSTILE]
    assert not list(workdir.parent.rglob("INJECTED"))


def test_braces_in_results_get_one_clear_message(tmp_path):
    """Braces are the one thing quoting cannot help: Snakemake reads them as wildcards."""
    overlay = tmp_path / "braces.yaml"
    overlay.write_text('results: "results/run{1}"\n')
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "config/demo.yaml", str(overlay)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "results = 'results/run{1}': Snakemake reads braces in a path as wildcards" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
