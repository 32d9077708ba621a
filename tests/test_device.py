"""GPU claiming: concurrent pipeline processes on one machine each take a different GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import device
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def test_processes_claim_distinct_names_until_none_is_free(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_held_locks", {})
    names = ["gpu-a", "gpu-b"]
    # Another process holds gpu-a for as long as it lives.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline import device; "
         "print(device.claim_free(['gpu-a']), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"PIPELINE_GPU_LOCK_DIR": str(tmp_path), "PATH": ""})
    try:
        assert holder.stdout.readline().strip() == "0"
        assert device.claim_free(names) == 1          # gpu-a is taken: this process gets gpu-b
        assert device.claim_free(names) == 1          # and keeps it on the next call
        assert device.claim_free(["gpu-a"]) is None   # nothing free
    finally:
        holder.stdin.close()
        holder.wait()
    assert device.claim_free(["gpu-a"]) == 0          # the holder exited: its lock is gone


def test_cuda_without_a_gpu_is_a_clear_error():
    if device.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PipelineError, match="torch sees no CUDA device"):
        device.resolve_device("cuda")
    assert device.resolve_device("auto").type == "cpu"


def test_exact_cuda_numerics_are_deterministic_fp32():
    """The switches a process that takes a GPU sets (in a new process: they are process-wide)."""
    code = ("import os, torch; from pipeline.device import use_exact_cuda_numerics; use_exact_cuda_numerics(); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32, "
            "torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark, "
            "os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False", "False", ":4096:8"]


@pytest.mark.cuda
@pytest.mark.skipif(not device.torch.cuda.is_available(), reason="needs a CUDA device; torch sees none")
def test_cuda_resolves_to_a_claimed_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_held_locks", {})
    claimed = device.resolve_device("cuda")
    assert claimed.type == "cuda" and claimed.index == device.torch.cuda.current_device()
    assert device.torch.are_deterministic_algorithms_enabled() and not device.torch.backends.cudnn.allow_tf32
    assert list(device._held_locks) == [f"gpu-{device.torch.cuda.get_device_properties(claimed.index).uuid}"]
    assert device.resolve_device("auto") == claimed


def test_claim_gpu_takes_the_first_gpu_no_other_process_holds(tmp_path, monkeypatch, capsys):
    """claim_gpu on two stand-in GPUs (this machine has none): locks are named by UUID."""
    from types import SimpleNamespace

    monkeypatch.setenv("PIPELINE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_held_locks", {})
    uuids = ["11111111-aaaa", "22222222-bbbb"]
    chosen = []
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(device.torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i]))
    monkeypatch.setattr(device.torch.cuda, "set_device", chosen.append)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline import device; "
         f"print(device.claim_free(['gpu-{uuids[0]}']), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"PIPELINE_GPU_LOCK_DIR": str(tmp_path), "PATH": ""})
    try:
        assert holder.stdout.readline().strip() == "0"
        assert str(device.claim_gpu()) == "cuda:1" and chosen == [1]
        # Forget the lock this process holds (its descriptor stays open, so the lock stays
        # held): claiming again is now what a third process would see, both GPUs taken.
        monkeypatch.setattr(device, "_held_locks", {})
        assert str(device.claim_gpu()) == "cuda:0"
        assert "all 2 visible GPU(s) are held by other pipeline processes; sharing cuda:0" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait()
