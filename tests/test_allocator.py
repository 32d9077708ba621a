"""The malloc tunables (pipeline.allocator): which variables a process gets, the entry points'
re-execution, and outputs that do not depend on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from pipeline import allocator
from pipeline.io.integrity import save_torch
from pipeline.launch import wire
from pipeline.nn.presets import build_unet

REPO = Path(__file__).resolve().parents[1]
TUNED = ":".join(f"{key}={value}" for key, value in allocator.TUNABLES.items())
glibc_only = pytest.mark.skipif(not allocator._is_glibc_linux(), reason="GLIBC_TUNABLES is glibc's")


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_is_glibc_linux", lambda: True)


def test_tunables_are_added_to_an_environment_without_them(glibc):
    assert allocator.tuned_environment({"HOME": "/x"}) == {"HOME": "/x", "GLIBC_TUNABLES": TUNED}


def test_other_tunables_of_the_user_are_kept(glibc):
    env = allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:" + TUNED


def test_a_value_the_user_set_wins(glibc):
    env = allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.hugetlb=0", *TUNED.split(":")[:2]]


def test_nothing_to_add_means_no_reexecution(glibc):
    assert allocator.tuned_environment({"GLIBC_TUNABLES": TUNED}) is None


def test_system_choice_and_other_c_libraries_keep_the_defaults(glibc, monkeypatch):
    assert allocator.tuned_environment({"PIPELINE_ALLOCATOR": "system"}) is None
    monkeypatch.setattr(allocator, "_is_glibc_linux", lambda: False)
    assert allocator.tuned_environment({}) is None


def test_an_unknown_choice_is_refused_with_the_choices(glibc):
    with pytest.raises(SystemExit, match="PIPELINE_ALLOCATOR='jemalloc': use one of tuned, system"):
        allocator.tuned_environment({"PIPELINE_ALLOCATOR": "jemalloc"})


REPORT = ("from pipeline.allocator import reexec_with_tuned_allocator\n"
          "reexec_with_tuned_allocator()\n"
          "import json, os, sys\n"
          "print(json.dumps([os.getpid(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES')]))\n")


@glibc_only
def test_a_process_replaces_itself_once_with_the_same_pid_and_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PIPELINE_ALLOCATOR")}
    process = subprocess.Popen([sys.executable, "-c", REPORT, "a b", "--c"], env=env, stdout=subprocess.PIPE,
                               text=True)
    out, _ = process.communicate(timeout=60)
    pid, argv, tunables = json.loads(out)
    assert (pid, argv, tunables) == (process.pid, ["a b", "--c"], TUNED)
    done = subprocess.run([sys.executable, "-c", REPORT], env={**env, "PIPELINE_ALLOCATOR": "system"},
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)[2] is None


@glibc_only
def test_samples_are_bit_identical_under_both_allocators(tmp_path):
    """A stage in its own process (as a cluster job) with glibc's defaults and with the tunables."""
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(1)
    save_torch({name: 0.05 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0)
                for name, t in model.state_dict().items()}, tmp_path / "weights.pt")
    settings = {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
                "n_samples": 3, "batch_size": 3, "chunk_size": 3, "seed": 0}
    images = {}
    for choice in ("system", "tuned"):
        out = tmp_path / choice / "samples.h5"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PIPELINE_ALLOCATOR": choice,
               wire.SOCKET_VARIABLE: wire.OFF}
        env.pop("GLIBC_TUNABLES", None)
        done = subprocess.run([sys.executable, "-m", "pipeline", "sample", "--weights", str(tmp_path / "weights.pt"),
                               "--dataset", "test", "--steps", "4", "--settings", json.dumps(settings),
                               "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        with h5py.File(out, "r") as f:
            images[choice] = f["images"][()].tobytes()
    assert images["system"] == images["tuned"]
