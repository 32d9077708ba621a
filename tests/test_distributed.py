"""Data-parallel training on CPU (gloo): N processes x batch b follow 1 process x batch N*b.

Each test runs the real `python -m pipeline train --processes 2`, which relaunches itself under
torchrun. Float summation order differs between one batch of 2b and two all-reduced batches of b,
so weights are compared to float tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import distributed, seeding
from pipeline.errors import PipelineError
from pipeline.nn.presets import build_unet
from pipeline.stages.train import train
from test_train import REPO, data_h5, load, tiny_settings  # noqa: F401  (data_h5 is a fixture)

WEIGHTS = ("weights_raw.pt", "weights_ema.pt", "weights_swa.pt")


def command(settings: dict, data: Path, out_dir: Path, processes: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist",
            "--recipe", settings["recipe"]["name"], "--seed", str(settings["seed"]),
            "--settings", json.dumps(settings), "--data", str(data), "--out-dir", str(out_dir),
            "--processes", str(processes), "--no-progress", *extra]


def run_processes(settings: dict, data: Path, out_dir: Path, processes: int = 2, *extra: str) -> None:
    # Two threads shared by the processes: one each, as the train rule would give them.
    env = {**os.environ, "OMP_NUM_THREADS": str(processes)}
    result = subprocess.run(command(settings, data, out_dir, processes, *extra), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def initial_weights(settings: dict) -> dict[str, torch.Tensor]:
    """The run's weights before its first step (the train stage's seeded initialisation)."""
    torch.manual_seed(seeding.derive_seed(settings["seed"], stream="init"))
    model = build_unet(settings["preset"], in_channels=1, learn_sigma=settings["diffusion"]["learn_sigma"])
    return model.state_dict()


def assert_same_trajectory(settings: dict, dir_a: Path, dir_b: Path) -> None:
    """The two runs moved the weights the same way, up to float rounding of the gradient sums.

    Compared relative to the distance travelled: Adam moves every weight by about lr per step
    however small its gradient, so where a gradient component is zero up to rounding (biases
    in front of a one-channel-per-group GroupNorm) single weights may differ by a step; a wrong
    draw (say, both processes using the same noise) changes the whole displacement.
    """
    start = initial_weights(settings)
    for name in WEIGHTS:
        a, b = load(dir_a / name), load(dir_b / name)
        assert a.keys() == b.keys()
        travelled = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
        apart = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        assert float(apart / travelled) < 1e-2, (name, float(apart), float(travelled))


def ddp_settings(recipe: str, steps: int = 4, **overrides) -> dict:
    # log_every 1: the replicas are compared after every step (the run fails if they differ).
    return tiny_settings(recipe, steps=steps, batch_size=4, log_every=1, **overrides)


@pytest.mark.parametrize("recipe", ["adm", "sam_rho0.1", "sgd_fsgld_tiny", "ip"])
def test_two_processes_match_one_process_with_twice_the_batch(recipe, data_h5, tmp_path):
    settings = ddp_settings(recipe)
    train(settings, data_h5, tmp_path / "one", progress=False)
    run_processes(settings, data_h5, tmp_path / "two")
    assert_same_trajectory(settings, tmp_path / "one", tmp_path / "two")
    with h5py.File(tmp_path / "two" / "train.h5") as f:
        assert f.attrs["processes"] == 2 and len(f["loss"]) == settings["steps"]
    assert not list((tmp_path / "two").glob("checkpoint-*.pt"))


def test_timestep_sampler_sees_the_global_batch(data_h5, tmp_path):
    """The loss-second-moment history after 2 steps equals the single-process one."""
    settings = ddp_settings("adm", steps=6, schedule_sampler="loss-second-moment", checkpoint_every=1)
    train(settings, data_h5, tmp_path / "one", progress=False, stop_after=2)
    run_processes(settings, data_h5, tmp_path / "two", 2, "--stop-after", "2")
    (one,), (two,) = (list((tmp_path / d).glob("checkpoint-*.pt")) for d in ("one", "two"))
    s1 = torch.load(one, weights_only=True)["sampler"]
    s2 = torch.load(two, weights_only=True)["sampler"]
    assert int(s1["loss_counts"].sum()) == 2 * 4  # every sample of both global batches recorded
    assert torch.equal(s1["loss_counts"], s2["loss_counts"])
    torch.testing.assert_close(s1["loss_history"], s2["loss_history"], rtol=1e-5, atol=1e-7)


def test_killed_two_process_run_resumes_on_one_process(data_h5, tmp_path):
    settings = ddp_settings("sam_rho0.1", steps=10, checkpoint_every=2)
    train(settings, data_h5, tmp_path / "whole", progress=False)

    # SIGKILL the whole torchrun process group once a checkpoint exists.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(command(settings, data_h5, tmp_path / "killed", 2), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob("checkpoint-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "weights_raw.pt").exists(), "killed before the end, as intended"

    train(settings, data_h5, tmp_path / "killed", progress=False)  # resume as one process
    assert_same_trajectory(settings, tmp_path / "whole", tmp_path / "killed")


def test_one_process_run_resumes_on_two_processes(data_h5, tmp_path):
    settings = ddp_settings("sgd_fsgld_tiny", steps=6, checkpoint_every=1)
    train(settings, data_h5, tmp_path / "whole", progress=False)
    train(settings, data_h5, tmp_path / "parts", progress=False, stop_after=3)
    run_processes(settings, data_h5, tmp_path / "parts")
    assert_same_trajectory(settings, tmp_path / "whole", tmp_path / "parts")


def test_m_sharpness_ascends_per_process(data_h5, tmp_path):
    """Per-process ascent differs from the global one with 2 processes, and equals it with 1."""
    settings = ddp_settings("sam_rho0.1")
    per_process = json.loads(json.dumps(settings))
    per_process["recipe"]["sam"]["m_sharpness"] = True
    run_processes(settings, data_h5, tmp_path / "global")
    run_processes(per_process, data_h5, tmp_path / "m2")
    a, b = load(tmp_path / "global" / "weights_raw.pt"), load(tmp_path / "m2" / "weights_raw.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4

    train(settings, data_h5, tmp_path / "g1", progress=False)
    train(per_process, data_h5, tmp_path / "m1", progress=False)
    a, b = load(tmp_path / "g1" / "weights_raw.pt"), load(tmp_path / "m1" / "weights_raw.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _check_replicas_worker(rank: int, init_file: str, drift: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        weights = [torch.ones(3, 3), torch.zeros(4)]
        if drift and rank == 1:
            weights[1][2] = 1e-6
        try:
            distributed.check_replicas_agree(weights, distributed.Processes(rank, 2, 2), step=7)
            results[rank] = "agree"
        except PipelineError as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("drift", [False, True])
def test_replica_check_catches_drift(drift, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_check_replicas_worker, args=(str(tmp_path / "init"), drift, results), nprocs=2)
    if drift:
        assert all("after step 7 the weights of process(es) [1] differ" in results[r] for r in (0, 1))
    else:
        assert dict(results) == {0: "agree", 1: "agree"}


def test_processes_must_be_positive(data_h5, tmp_path):
    settings = ddp_settings("adm")
    result = subprocess.run(command(settings, data_h5, tmp_path, 0), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--processes must be at least 1, got 0" in result.stderr
