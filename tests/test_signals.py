"""SIGTERM and SIGINT during training: a checkpoint at the next step boundary, one line on stderr,
exit status 75, and a rerun that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.io.integrity import sealed_h5
from pipeline.settings import train_settings
from pipeline.training.signals import EXIT_STOPPED

REPO = Path(__file__).resolve().parents[1]
# One thread in every process: bit identity holds for a fixed thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.h5"
    grid = np.add.outer(np.arange(16), np.arange(16))
    images = np.stack([(grid * (i % 5 + 1)) % 256 for i in range(32)]).astype(np.uint8)[..., None]
    with sealed_h5(path) as f:
        f.create_dataset("images", data=images)
    return path


def command(recipe: str, data_h5: Path, out_dir: Path, steps: int) -> list[str]:
    config = load_config([REPO / "config.yaml", REPO / "config" / "demo.yaml"])
    settings = train_settings(config, "fashion_mnist", recipe, seed=3)
    # Checkpoints every 2 steps only show that training is under way; the stop writes its own.
    settings.update(preset="tiny", resolution=16, batch_size=4, steps=steps, log_every=2,
                    checkpoint_every=2, device="cpu", swa={"start_fraction": 0.5, "every": 1})
    return [sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist", "--recipe", recipe,
            "--seed", "3", "--settings", json.dumps(settings), "--data", str(data_h5),
            "--out-dir", str(out_dir), "--no-progress"]


def signal_mid_run(cmd: list[str], out_dir: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run `cmd`, send `sig` once its first checkpoint exists, and wait for it to end."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out_dir.glob("checkpoint-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_checkpoints_and_the_rerun_is_bit_identical(data_h5, tmp_path):
    steps = 30
    subprocess.run(command("sam_rho0.1", data_h5, tmp_path / "whole", steps), cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    cmd = command("sam_rho0.1", data_h5, tmp_path / "stopped", steps)
    stopped = signal_mid_run(cmd, tmp_path / "stopped", signal.SIGTERM)

    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("train sam_rho0.1: stopped by SIGTERM at step ") and "rerun the same command" in last
    assert "Traceback" not in stopped.stderr
    (ckpt,) = (tmp_path / "stopped").glob("checkpoint-*.pt")
    at = int(torch.load(ckpt, weights_only=True)["step"])
    assert 2 <= at < steps and f"at step {at}/{steps}" in last
    assert not (tmp_path / "stopped" / "weights_raw.pt").exists()

    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    for name in ("weights_raw.pt", "weights_ema.pt", "weights_swa.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(tmp_path / "stopped" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with h5py.File(tmp_path / "whole" / "train.h5") as f, h5py.File(tmp_path / "stopped" / "train.h5") as g:
        assert np.array_equal(f["loss"][()], g["loss"][()])


def test_sigint_stops_without_a_traceback(data_h5, tmp_path):
    cmd = command("adm", data_h5, tmp_path, steps=40)
    stopped = signal_mid_run(cmd, tmp_path, signal.SIGINT)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("train adm: stopped by SIGINT at step ")
    assert not (tmp_path / "weights_raw.pt").exists()
    assert len(list(tmp_path.glob("checkpoint-*.pt"))) == 1
