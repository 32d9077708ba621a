"""The train stage: every recipe trains and writes its three weights files; runs resume
bit-identically after a kill; a non-finite loss stops the run with a clear message."""

from __future__ import annotations

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

from pipeline.io.integrity import seal_h5
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.settings import train_settings
from pipeline.stages.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_h5(tmp_path_factory) -> Path:
    """64 structured 16x16 grey images in the data stage's layout."""
    path = tmp_path_factory.mktemp("data") / "data.h5"
    grid = np.add.outer(np.arange(16), np.arange(16))
    images = np.stack([(grid * (i % 7 + 1)) % 256 for i in range(64)]).astype(np.uint8)[..., None]
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        seal_h5(f)  # as every writer of the pipeline does
    return path


def tiny_settings(recipe: str, steps: int = 6, **overrides) -> dict:
    """Run settings of `recipe` from the real config, shrunk to the tiny preset."""
    config = load_config([REPO / "config.yaml", REPO / "config" / "demo.yaml"])
    # The paper's Adam lr, not the demo's 1e-3: the tests' tolerances (SAM across process counts)
    # are set for it, and they should not move when the demo's training budget does.
    config["training"]["optimizer"]["lr"] = 1.0e-4
    config["recipes"]["sgd_fsgld_tiny"] = {"optimizer": {"name": "sgd", "lr": 0.01, "weight_decay": 0.0},
                                           "fsgld": {"beta_inv": 1e-10}}
    config["recipes"]["ip_sam"] = {"input_perturbation": {"gamma": 0.1}, "sam": {"rho": 0.05}}
    settings = train_settings(config, "fashion_mnist", recipe, seed=3)
    settings.update(preset="tiny", resolution=16, batch_size=4, steps=steps, log_every=2,
                    checkpoint_every=2, device="cpu", swa={"start_fraction": 0.5, "every": 1})
    settings.update(overrides)
    return settings


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


RECIPES = ["adm", "ip", "sam_rho0.1", "fsgld", "fsgld_adam", "sgd_fsgld_tiny", "ip_sam"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_and_writes_three_weights(recipe, data_h5, tmp_path, torch_device):
    settings = tiny_settings(recipe, device=torch_device.type)
    if recipe == "fsgld":  # the faithful SGD base at lr 0.1 is too hot for a 6-step smoke test
        settings["recipe"]["optimizer"]["lr"] = 0.01
    train(settings, data_h5, tmp_path, progress=False)
    weights = {avg: load(tmp_path / f"weights_{avg}.pt") for avg in ("raw", "ema", "swa")}
    keys = list(weights["raw"])
    assert "out.2.weight" in keys and keys == list(weights["ema"]) == list(weights["swa"])
    # The three are different averages of one trajectory.
    assert not torch.equal(weights["raw"]["out.2.weight"], weights["ema"]["out.2.weight"])
    assert not torch.equal(weights["raw"]["out.2.weight"], weights["swa"]["out.2.weight"])
    with h5py.File(tmp_path / "train.h5") as f:
        assert f["loss"].shape == (6,) and np.isfinite(f["loss"][()]).all()
        assert (f["grad_norm"][()] > 0).all()
        assert f["interval_seconds"].shape == (3,)
        assert f.attrs["stage"] == "train"
        assert "recipe" in f.attrs["settings_yaml"]
    assert not list(tmp_path.glob("checkpoint-*.pt")), "a finished run removes its checkpoint"


def test_swa_is_the_mean_of_its_snapshots(data_h5, tmp_path):
    """With SWA collecting at steps 3..6 of 6, the SWA weights are the mean of those four."""
    snapshots = []
    for stop in (3, 4, 5, 6):
        out = tmp_path / f"until{stop}"
        train(tiny_settings("adm", steps=stop, swa={"start_fraction": 0.5, "every": 1}), data_h5, out,
              progress=False)
        snapshots.append(load(out / "weights_raw.pt"))
    # start_fraction 0.5 of 6 steps = step 3, so the full run averages steps 3, 4, 5, 6.
    swa = load(tmp_path / "until6" / "weights_swa.pt")
    for key in ("out.2.weight", "input_blocks.0.0.weight"):
        mean = torch.stack([s[key] for s in snapshots]).mean(0)
        torch.testing.assert_close(swa[key], mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recipe", ["sam_rho0.1", "fsgld_adam"])
def test_interrupted_run_resumes_bit_identical(recipe, data_h5, tmp_path, torch_device):
    settings = tiny_settings(recipe, steps=6, device=torch_device.type)
    train(settings, data_h5, tmp_path / "whole", progress=False)
    train(settings, data_h5, tmp_path / "parts", progress=False, stop_after=3)
    assert not (tmp_path / "parts" / "weights_raw.pt").exists()
    train(settings, data_h5, tmp_path / "parts", progress=False)
    for name in ("weights_raw.pt", "weights_ema.pt", "weights_swa.pt"):
        a, b = load(tmp_path / "whole" / name), load(tmp_path / "parts" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sigkill_at_any_moment_then_rerun_is_bit_identical(data_h5, tmp_path):
    """A real `python -m pipeline train` process killed with SIGKILL mid-run, then rerun."""
    settings = tiny_settings("sam_rho0.1", steps=12)
    import json

    def command(out_dir: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist", "--recipe",
                "sam_rho0.1", "--seed", "3", "--settings", json.dumps(settings), "--data",
                str(data_h5), "--out-dir", str(out_dir), "--no-progress"]

    # Both runs in processes with one thread: bit identity holds for a fixed thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, check=True, capture_output=True)
    cmd = command(tmp_path / "killed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("checkpoint-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "weights_raw.pt").exists(), "killed before the end, as intended"
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    for name in ("weights_raw.pt", "weights_ema.pt", "weights_swa.pt"):
        a, b = load(tmp_path / "whole" / name), load(tmp_path / "killed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cuda_options_act_on_cuda_only(data_h5, tmp_path, torch_device):
    """bf16 autocast and channels-last: ignored on the CPU (bit-identical), close to fp32 on CUDA."""
    plain = tiny_settings("adm", steps=4, device=torch_device.type)
    fast = tiny_settings("adm", steps=4, device=torch_device.type, cuda={"bf16": True, "channels_last": True,
                                                                         "compile": False})
    train(plain, data_h5, tmp_path / "plain", progress=False)
    train(fast, data_h5, tmp_path / "fast", progress=False)
    a, b = load(tmp_path / "plain" / "weights_raw.pt"), load(tmp_path / "fast" / "weights_raw.pt")
    losses = {}
    for name in ("plain", "fast"):
        with h5py.File(tmp_path / name / "train.h5") as f:
            losses[name] = f["loss"][()]
    assert np.isfinite(losses["fast"]).all()
    if torch_device.type == "cpu":
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert any(not torch.equal(a[k], b[k]) for k in a), "bf16 autocast changed nothing on CUDA"
        # Same batches and draws: the bf16 loss is the fp32 loss up to bf16 rounding (~1%).
        np.testing.assert_allclose(losses["fast"], losses["plain"], rtol=0.03)


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(data_h5, tmp_path):
    settings = tiny_settings("adm", steps=8)
    settings["recipe"]["optimizer"]["lr"] = 1e6  # diverges within a few steps
    with pytest.raises(PipelineError, match=r"non-finite training loss at step \d+ of recipe 'adm' \(term: "):
        train(settings, data_h5, tmp_path, progress=False)
    assert not (tmp_path / "weights_raw.pt").exists()
    assert list(tmp_path.glob("checkpoint-*.pt")), "the last good checkpoint is kept"


def test_changed_settings_do_not_resume_an_old_checkpoint(data_h5, tmp_path):
    settings = tiny_settings("sam_rho0.1", steps=6)
    train(settings, data_h5, tmp_path, progress=False, stop_after=3)
    (old,) = tmp_path.glob("checkpoint-*.pt")
    edited = tiny_settings("sam_rho0.1", steps=6)
    edited["recipe"]["sam"]["rho"] = 0.02
    train(edited, data_h5, tmp_path, progress=False)
    assert not old.exists()
    fresh = tmp_path / "fresh"
    train(edited, data_h5, fresh, progress=False)
    a, b = load(tmp_path / "weights_raw.pt"), load(fresh / "weights_raw.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_data_is_a_clear_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist",
                             "--recipe", "adm", "--data", str(tmp_path / "nope.h5")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "prepare" in result.stderr
    assert "Traceback" not in result.stderr


def test_input_perturbation_builds_x_t_from_eps_plus_gamma_xi(data_h5):
    """IP: x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi), the target stays eps."""
    from pipeline import seeding
    from pipeline.data.loader import TrainingBatches
    from pipeline.diffusion.gaussian import create_diffusion
    from pipeline.diffusion.timestep_sampler import UniformSampler
    from pipeline.stages.train import draw_step

    batches = TrainingBatches(data_h5, batch_size=4, seed=3)
    cpu = torch.device("cpu")
    x0, t, _, noise, input_noise = draw_step(batches, UniformSampler(1000), 3, 5, 0.1, cpu)
    xi = torch.randn(x0.shape, generator=seeding.generator(3, 5, stream="input_perturbation"))
    torch.testing.assert_close(input_noise, noise + 0.1 * xi, rtol=0, atol=0)
    assert draw_step(batches, UniformSampler(1000), 3, 5, 0.0, cpu)[4] is None
    # Same step, same draws: the plain recipe sees exactly the same x0, t and eps.
    x0b, tb, _, noiseb, _ = draw_step(batches, UniformSampler(1000), 3, 5, 0.0, cpu)
    assert torch.equal(x0, x0b) and torch.equal(t, tb) and torch.equal(noise, noiseb)

    diffusion = create_diffusion()
    abar = torch.from_numpy(diffusion.tables.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    seen = {}

    def model(x_t, timesteps):
        seen["x_t"] = x_t
        return torch.zeros(x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:])

    terms = diffusion.training_losses(model, x0, t, noise, input_noise=input_noise)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * (noise + 0.1 * xi)
    torch.testing.assert_close(seen["x_t"], expected, rtol=1e-5, atol=1e-5)
    # A zero prediction's MSE is the target's energy: the target is eps, not eps + gamma xi.
    torch.testing.assert_close(terms["mse"], noise.square().mean(dim=(1, 2, 3)))
