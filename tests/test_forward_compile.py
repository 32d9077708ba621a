"""forward_compile: when the UNet's forward is compiled, and that compiling changes results by rounding only."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.io.integrity import save_torch
from pipeline.nn.forward_compile import CompilePolicy, apply_policy, compile_forward, flops_per_image
from pipeline.nn.presets import build_unet
from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.stages.sample import sample_to_file

CPU = torch.device("cpu")
SHAPE = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_tiny_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny preset with every weight nudged: ADM's zero-initialised output conv would give eps = 0."""
    torch.manual_seed(seed)
    model = build_unet("tiny", in_channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------------
# The policy (no compiling).

def test_auto_compiles_at_the_threshold_of_its_device_only():
    policy = CompilePolicy.from_config({"mode": "auto", "min_gflop": {"cpu": 100}})
    assert policy.decide(CPU, 99e9)[0] is False
    chosen, reason = policy.decide(CPU, 100e9)
    assert chosen and "min_gflop.cpu" in reason
    chosen, reason = policy.decide(torch.device("cuda"), 1e18)
    assert not chosen and "no threshold for cuda" in reason


def test_on_and_off_ignore_the_work_and_bad_modes_are_named():
    assert CompilePolicy.from_config({"mode": "on", "min_gflop": {}}).decide(CPU, 0.0)[0] is True
    assert CompilePolicy.from_config({"mode": "off", "min_gflop": {"cpu": 0}}).decide(CPU, 1e30)[0] is False
    assert CompilePolicy.from_config(None).mode == "off"  # a stage given settings without the key
    with pytest.raises(PipelineError, match="forward_compile.mode must be one of auto, on, off"):
        CompilePolicy.from_config({"mode": "yes"})


def test_auto_counts_the_whole_jobs_flops():
    model = random_tiny_unet()
    per_image = flops_per_image(model, SHAPE)
    # Two 3x3 convolutions of 32 channels at 16x16 alone take 2 * 2 * 9 * 32^2 * 256 FLOPs.
    assert per_image > 2 * 2 * 9 * 32 ** 2 * 256
    threshold_images = 1000
    policy = CompilePolicy.from_config({"mode": "auto", "min_gflop": {"cpu": threshold_images * per_image / 1e9}})
    assert not apply_policy(model, policy, CPU, threshold_images - 1, 8, SHAPE, "test")
    assert "forward" not in vars(model)  # eager: the module's own forward
    assert apply_policy(model, policy, CPU, threshold_images, 8, SHAPE, "test")
    assert "forward" in vars(model)


def test_auto_never_compiles_less_than_two_full_batches():
    policy = CompilePolicy.from_config({"mode": "auto", "min_gflop": {"cpu": 0}})
    assert not apply_policy(random_tiny_unet(), policy, CPU, 15, 8, SHAPE, "test")


def job_image_forwards(config: dict) -> dict[str, int]:
    """Images through the UNet per job of each compiled stage, as the stages count them."""
    metrics = config["metrics"]
    lpf, perturbation = metrics["lpf"], metrics["perturbation"]
    sigmas = len({lpf["sigma"], *lpf["sigma_sweep"]})
    nonzero_radii = sum(1 for r in perturbation["radii"] if r != 0)
    return {
        "sample": config["sampling"]["n_samples"] * max(config["study"]["sampling_steps"]),
        "lpf": (1 + len(lpf["scalings"]) * sigmas * lpf["draws"]) * lpf["n_eval"],
        "perturbation": (1 + perturbation["directions"] * nonzero_radii) * perturbation["n_eval"],
        "surface": metrics["surface"]["grid"] ** 2 * metrics["surface"]["n_eval"],
        "exposure": 2 * metrics["exposure"]["n_images"] * sum(metrics["exposure"]["steps"]),
    }


@pytest.mark.parametrize("overlay", ["config/demo.yaml", "config/cpu-study.yaml"])
def test_config_yaml_compiles_no_job_of_the_demo_or_the_cpu_study(overlay):
    """Their jobs evaluate too little to repay a compile: config.yaml says so, this checks it."""
    config = load_config([DEFAULT_CONFIG, DEFAULT_CONFIG.parent / overlay])
    policy = CompilePolicy.from_config(config["forward_compile"])
    assert policy.mode == "auto"
    for dataset in config["study"]["datasets"]:
        entry = config["datasets"][dataset]
        model = build_unet(entry["preset"], in_channels=entry["channels"], learn_sigma=True)
        per_image = flops_per_image(model, (entry["channels"], entry["resolution"], entry["resolution"]))
        for stage, forwards in job_image_forwards(config).items():
            assert not policy.decide(CPU, forwards * per_image)[0], (dataset, stage, forwards)


# ------------------------------------------------------------------------------------------
# Compiled forwards (each test compiles the tiny UNet once: seconds from a warm inductor cache).

def test_compiled_forward_sees_in_place_weight_edits_and_matches_eager():
    """LPF, perturbation and surface move the weights in place between loss evaluations."""
    model = random_tiny_unet()
    reference = random_tiny_unet()
    compile_forward(model, batch_size=4)
    x, t = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        before = model(x, t)
        torch.testing.assert_close(before, reference(x, t), rtol=1e-4, atol=1e-5)
        noise = [0.01 * torch.randn_like(p) for p in model.parameters()]
        for p, q, z in zip(model.parameters(), reference.parameters(), noise):
            p.add_(z)
            q.add_(z)
        after = model(x, t)
        torch.testing.assert_close(after, reference(x, t), rtol=1e-4, atol=1e-5)
        assert (after - before).abs().max() > 1e-3  # the edit reached the compiled graph
        # A batch of another size runs eager, bit-identical to the uncompiled module.
        assert torch.equal(model(x[:3], t[:3]), reference(x[:3], t[:3]))


def test_compiled_samples_within_one_level_of_eager(tmp_path):
    """The sample stage with forward_compile on: same noise, pixels at most one uint8 level apart."""
    weights = tmp_path / "weights.pt"
    save_torch(random_tiny_unet(1).state_dict(), weights)
    base = {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
            "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
            "n_samples": 12, "batch_size": 4, "chunk_size": 12, "seed": 0}
    images = {}
    for mode in ("off", "on"):
        settings = {**base, "forward_compile": {"mode": mode, "min_gflop": {}}}
        out = tmp_path / f"{mode}.h5"
        sample_to_file(settings, weights, out, tmp_path / f"{mode}.png", 10, progress=False)
        with h5py.File(out, "r") as f:
            images[mode] = f["images"][:].astype(int)
            assert bool(f.attrs["forward_compiled"]) == (mode == "on")
    difference = np.abs(images["on"] - images["off"])
    assert difference.max() <= 1
    assert (difference != 0).mean() < 0.01
    assert len({image.tobytes() for image in images["on"].astype(np.uint8)}) == 12
