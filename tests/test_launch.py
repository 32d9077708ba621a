"""The fork server (pipeline.launch): jobs through it write the same bytes as jobs in their own
process, exit codes and signals come back, and a killed client takes its child with it."""

from __future__ import annotations

import json
import os
import zipfile
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
import torch

from pipeline import allocator
from pipeline.io.integrity import save_torch
from pipeline.launch import wire
from pipeline.nn.presets import build_unet

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "pipeline.launch"]


@pytest.fixture(scope="module")
def server():
    """A server on a short socket path (Unix sockets take at most 107 bytes), ended after the module."""
    folder = tempfile.mkdtemp(prefix="fs-", dir="/tmp")
    path = os.path.join(folder, "s.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.launch.server", "--socket", path,
                                "--watch-pid", str(os.getpid())], env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        assert process.poll() is None, "the fork server exited while importing"
        assert time.monotonic() < deadline, "the fork server did not listen within 300 s"
        time.sleep(0.05)
    yield process, path
    process.terminate()
    assert process.wait(timeout=60) == 0
    assert not os.path.exists(path)
    os.rmdir(folder)


def launch(args, socket_path, threads="1", **kwargs) -> subprocess.CompletedProcess:
    # As Snakemake sets them, but OpenBLAS at 1 thread (the server's; see pipeline/launch/wire.py).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": "1", wire.SOCKET_VARIABLE: socket_path}
    return subprocess.run([*LAUNCH, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


# Attributes that differ between two runs in fresh processes too: the writing time, the digest of
# the attributes that include it, and measured durations. Everything else must match bit for bit.
TIMESTAMPED = {"created_utc", "attrs_sha256", "sampling_seconds"}


def h5_content(path) -> dict:
    """Every dataset's bytes and every attribute of an HDF5 file but the time-stamped ones."""
    content = {}
    with h5py.File(path, "r") as f:
        content["/"] = {k: repr(v) for k, v in f.attrs.items() if k not in TIMESTAMPED}
        def visit(name, obj):
            data = obj[()].tobytes() if isinstance(obj, h5py.Dataset) else None
            content[name] = ({k: repr(v) for k, v in obj.attrs.items() if k not in TIMESTAMPED}, data)
        f.visititems(visit)
    return content


def pt_content(path) -> dict:
    """The members of a torch.save zip (tensors' bytes, the pickle, the seal), by name."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """Random "tiny" UNet weights (an untrained one outputs zeros)."""
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(1)
    state = {name: 0.05 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0)
             for name, t in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "weights.pt"
    save_torch(state, path)
    return str(path)


def test_server_imports_start_no_threads(server):
    """Fork copies only the calling thread: a pool started by the server's imports (OpenMP's, a
    compile worker's) would be missing in every child. The server was started without
    OMP_NUM_THREADS, where `import torch` alone would start OpenMP's pool."""
    process, _ = server
    assert os.listdir(f"/proc/{process.pid}/task") == [str(process.pid)]


@pytest.mark.skipif(not allocator._is_glibc_linux(), reason="GLIBC_TUNABLES is glibc's")
@pytest.mark.skipif(os.environ.get("PIPELINE_ALLOCATOR") == "system", reason="PIPELINE_ALLOCATOR=system set")
def test_server_runs_with_the_malloc_tunables(server):
    """Started without them, the server re-executed itself with them (its children share its malloc)."""
    process, _ = server
    assert "GLIBC_TUNABLES" not in os.environ
    # The raw block, not split: glibc cuts the variable's copy there into pieces as it parses it.
    raw = Path(f"/proc/{process.pid}/environ").read_bytes()
    assert b"GLIBC_TUNABLES=" in raw
    assert all(f"{key}={value}".encode() in raw for key, value in allocator.TUNABLES.items())


def test_quantize_through_server_writes_the_same_content(server, tiny_weights, tmp_path):
    _, path = server
    outputs = {}
    for route, socket_path in (("forked", path), ("own process", wire.OFF)):
        out, codes = tmp_path / route / "weights.pt", tmp_path / route / "codes.h5"
        done = launch(["quantize", "--weights", tiny_weights, "--precision", "int8pc", "--out", str(out),
                       "--codes", str(codes)], socket_path)
        assert done.returncode == 0, done.stderr
        assert "note:" not in done.stderr
        outputs[route] = (pt_content(out), h5_content(codes))
    assert outputs["forked"] == outputs["own process"]


def test_sample_through_server_writes_the_same_samples(server, tiny_weights, tmp_path):
    _, path = server
    settings = {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
                "n_samples": 3, "batch_size": 2, "chunk_size": 2, "seed": 0}
    images = {}
    for route, socket_path in (("forked", path), ("own process", wire.OFF)):
        out = tmp_path / route / "samples.h5"
        done = launch(["sample", "--weights", tiny_weights, "--dataset", "test", "--steps", "4",
                       "--settings", json.dumps(settings), "--out", str(out), "--no-progress"], socket_path,
                      threads="2")  # the child starts its own OpenMP pool
        assert done.returncode == 0, done.stderr
        assert "note:" not in done.stderr
        images[route] = (h5_content(out), (out.parent / "grid.png").read_bytes())
    assert images["forked"] == images["own process"]


def test_exit_codes_and_output_come_back(server, tiny_weights, tmp_path):
    _, path = server
    helped = launch(["quantize", "--help"], path)
    assert helped.returncode == 0 and "--precision" in helped.stdout
    refused = launch(["quantize", "--weights", tiny_weights, "--precision", "int3", "--out",
                      str(tmp_path / "bad.pt")], path)
    assert refused.returncode == 2 and "unknown precision" in refused.stderr
    assert not (tmp_path / "bad.pt").exists()
    # The job's cwd is the child's: a relative --out lands in the client's folder.
    relative = launch(["quantize", "--weights", tiny_weights, "--precision", "fp32", "--out", "w.pt"], path,
                      cwd=tmp_path)
    assert relative.returncode == 0, relative.stderr
    assert (tmp_path / "w.pt").read_bytes() == Path(tiny_weights).read_bytes()


def blocked_job(path: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A client whose child blocks opening a FIFO nobody writes to; the child's pid."""
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    _, socket_path = path
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           wire.SOCKET_VARIABLE: socket_path}
    before = set(children_of(_server_pid(path)))
    client = subprocess.Popen([*LAUNCH, "quantize", "--weights", str(fifo), "--precision", "int8", "--out",
                               str(tmp_path / "x.pt")], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        new = set(children_of(_server_pid(path))) - before
        if new:
            return client, new.pop()
        assert time.monotonic() < deadline and client.poll() is None, "no child appeared"
        time.sleep(0.05)


def _server_pid(server) -> int:
    return server[0].pid


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for the server to reap it
            return True
        time.sleep(0.05)
    return False


def test_killed_client_kills_its_child(server, tmp_path):
    client, child = blocked_job(server, tmp_path)
    client.kill()  # what Snakemake does to a cancelled job: the client goes without a word
    client.wait(timeout=30)
    assert _gone(child, within=30)


def test_signals_reach_the_child_and_come_back(server, tmp_path):
    client, child = blocked_job(server, tmp_path)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    assert _gone(child, within=30)


def test_no_server_runs_in_process(tiny_weights, tmp_path):
    done = launch(["quantize", "--weights", tiny_weights, "--precision", "fp32", "--out", str(tmp_path / "w.pt")],
                  str(tmp_path / "no-such.sock"))
    assert done.returncode == 0 and "note:" not in done.stderr
    assert (tmp_path / "w.pt").exists()


def test_mismatched_start_up_variables_run_in_process(server, tiny_weights, tmp_path):
    _, path = server
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_DYNAMIC": "FALSE", wire.SOCKET_VARIABLE: path}
    done = subprocess.run([*LAUNCH, "quantize", "--weights", tiny_weights, "--precision", "fp32", "--out",
                           str(tmp_path / "w.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "start-up variables (MKL_DYNAMIC) differ" in done.stderr and "running the stage in this process" in done.stderr
    del env["OMP_NUM_THREADS"], env["MKL_DYNAMIC"]
    done = subprocess.run([*LAUNCH, "quantize", "--help"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "sets no OMP_NUM_THREADS" in done.stderr
