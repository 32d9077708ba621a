"""Diffusion maths against guided-diffusion's recorded numbers, plus sampler and trainer behaviour.

The reference vectors live in /work/shared/reference (see its README). The UNet is not used
here: recorded model outputs stand in for it, and behavioural tests use a tiny conv net.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.gaussian import create_diffusion
from pipeline.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from pipeline.diffusion.sampler import sample_images, to_uint8
from pipeline.diffusion.schedule import DiffusionTables, named_beta_schedule, respace_betas, space_timesteps
from pipeline.diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_timestep_sampler,
)
from pipeline.errors import PipelineError

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TABLE_NAMES = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]


def load_reference(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.fail(f"reference vectors {path} are missing: the shared reference directory must sit "
                    f"beside the repository (../shared/reference relative to /work/main)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def diffusion_ref() -> dict:
    return load_reference("diffusion_vectors.pt")


@pytest.fixture(scope="module")
def loss_ref() -> dict:
    return load_reference("loss_vectors.pt")


@pytest.fixture(scope="module")
def sampler_ref() -> dict:
    return load_reference("sampler_vectors.pt")


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, atol_per_sample: torch.Tensor, rtol: float = 1e-5):
    """|got - want| <= atol_i + rtol |want| elementwise, with one atol per sample (dim 0)."""
    bound = atol_per_sample.to(want.dtype).reshape(-1, *([1] * (want.ndim - 1))) + rtol * want.abs()
    excess = (got - want).abs() - bound
    assert got.shape == want.shape
    assert (excess <= 0).all(), f"exceeds scaled tolerance by up to {excess.max().item():.3g}"


class TinyNet(nn.Module):
    """A two-layer conv net with a time input, standing in for the UNet: (N, C, H, W) -> (N, 2C, H, W)."""

    def __init__(self, channels: int = 3, hidden: int = 16, learn_sigma: bool = True):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, (2 if learn_sigma else 1) * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.time(t.to(x.dtype)[:, None] / 1000)[:, :, None, None]
        return self.out(F.silu(h))


def seeded_net(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)  # only parameter initialisation; every draw under test uses generators
    return TinyNet(**kwargs)


# ----------------------------------------------------------------------------------------------
# Schedules and respacing


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_tables_match_reference(diffusion_ref, schedule):
    want = diffusion_ref["schedules"][f"{schedule}_1000"]
    got = DiffusionTables.from_betas(named_beta_schedule(schedule, 1000)).as_dict()
    assert list(got) == TABLE_NAMES
    for name in TABLE_NAMES:
        assert got[name].dtype == np.float64
        torch.testing.assert_close(torch.from_numpy(got[name]), want[name], rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("key", ["1000/20", "1000/100", "1000/10,5", "1000/ddim25"])
def test_respaced_timesteps_match_reference(diffusion_ref, key):
    want = diffusion_ref["respacings"][key]
    assert space_timesteps(want["num_timesteps"], want["spec"]) == list(want["timesteps"])


def test_space_timesteps_list_form_and_errors():
    assert space_timesteps(1000, [20]) == space_timesteps(1000, "20")
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(10, "1") == [0]
    with pytest.raises(PipelineError):
        space_timesteps(10, "11")
    with pytest.raises(PipelineError):
        space_timesteps(10, "abc")
    with pytest.raises(PipelineError):
        named_beta_schedule("quadratic", 10)


def test_spaced_cosine_tables_and_timestep_map(diffusion_ref):
    want = diffusion_ref["spaced"]["cosine_1000/20"]
    diffusion = create_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="20")
    assert diffusion.num_timesteps == 20 and diffusion.original_num_timesteps == 1000
    assert diffusion.timestep_map == list(want["timestep_map"])
    got = diffusion.tables.as_dict()
    for name in TABLE_NAMES:
        torch.testing.assert_close(torch.from_numpy(got[name]), want[name], rtol=1e-12, atol=0, msg=name)

    # The short chain reaches exactly the long chain's noise levels at the kept steps.
    base = named_beta_schedule("cosine", 1000)
    new_betas, kept = respace_betas(base, want["timestep_map"])
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - base)[kept], rtol=1e-12, atol=1e-15)


def test_model_timesteps_maps_respaced_indices():
    respaced = create_diffusion(timestep_respacing="20")
    k = torch.tensor([0, 1, 19, 5])
    want = torch.tensor([respaced.timestep_map[i] for i in k.tolist()])
    assert torch.equal(respaced.model_timesteps(k), want)
    full = create_diffusion()
    assert torch.equal(full.model_timesteps(k), k)
    # Respacing a respaced chain composes the maps.
    nested = respaced.respaced("5")
    assert nested.timestep_map == [respaced.timestep_map[i] for i in space_timesteps(20, "5")]


# ----------------------------------------------------------------------------------------------
# Forward process, posterior, reverse step, loss terms (loss_vectors.pt: cosine, T = 1000)


def test_q_sample_and_posterior_match_reference(loss_ref):
    diffusion = create_diffusion()
    x_start, t, noise = loss_ref["x_start"], loss_ref["t"], loss_ref["noise"]
    x_t = diffusion.q_sample(x_start, t, noise)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, loss_ref["q_sample"], rtol=1e-5, atol=1e-5)

    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, loss_ref["q_sample"], t)
    want = loss_ref["q_posterior"]
    torch.testing.assert_close(mean, want["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance, want["variance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_variance, want["log_variance_clipped"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_matches_reference(loss_ref, clip):
    diffusion = create_diffusion()
    t = loss_ref["t"]
    out = diffusion.p_mean_variance(loss_ref["model_output"], loss_ref["q_sample"], t, clip_denoised=clip)
    want = loss_ref["p_mean_variance" if clip else "p_mean_variance_unclipped"]
    scaled_atol = 1e-5 * torch.from_numpy(diffusion.tables.sqrt_recip_alphas_cumprod)[t]
    assert_close_scaled(out["pred_xstart"], want["pred_xstart"], scaled_atol)
    assert_close_scaled(out["mean"], want["mean"], scaled_atol)
    torch.testing.assert_close(out["variance"], want["variance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["log_variance"], want["log_variance"], rtol=1e-5, atol=1e-5)
    if clip:
        assert out["pred_xstart"].abs().max() <= 1


def test_training_loss_terms_match_reference(loss_ref):
    diffusion = create_diffusion()
    calls = []

    def recorded_unet(x_t, timesteps):
        calls.append((x_t, timesteps))
        return loss_ref["model_output"]

    terms = diffusion.training_losses(recorded_unet, loss_ref["x_start"], loss_ref["t"], loss_ref["noise"])
    (x_t, timesteps), = calls
    torch.testing.assert_close(x_t, loss_ref["q_sample"], rtol=1e-5, atol=1e-5)
    assert torch.equal(timesteps, loss_ref["t"])
    for name in ("mse", "vb", "loss"):
        assert terms[name].shape == (4,)
        torch.testing.assert_close(terms[name], loss_ref["terms"][name], rtol=1e-5, atol=1e-5, msg=name)


def test_vb_gradient_reaches_only_variance_channels(loss_ref):
    diffusion = create_diffusion()
    output = loss_ref["model_output"].clone().requires_grad_(True)
    terms = diffusion.training_losses(lambda x, t: output, loss_ref["x_start"], loss_ref["t"], loss_ref["noise"])
    terms["vb"].sum().backward()
    assert output.grad[:, :3].abs().max() == 0
    assert output.grad[:, 3:].abs().max() > 0


def test_input_noise_perturbs_the_input_but_not_the_target(loss_ref):
    diffusion = create_diffusion()
    x_start, t, noise = loss_ref["x_start"], loss_ref["t"], loss_ref["noise"]
    perturbed = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))
    seen = []

    def perfect_eps(x_t, timesteps):
        # Predicts the regression target exactly, so mse must vanish whatever x_t was built from.
        seen.append(x_t)
        return torch.cat([noise, torch.zeros_like(noise)], dim=1)

    terms = diffusion.training_losses(perfect_eps, x_start, t, noise, input_noise=perturbed)
    assert torch.equal(seen[0], diffusion.q_sample(x_start, t, perturbed))
    assert terms["mse"].abs().max() == 0
    # The VB term is evaluated at the perturbed x_t, so it differs from the unperturbed run.
    plain = diffusion.training_losses(perfect_eps, x_start, t, noise)
    assert not torch.allclose(terms["vb"], plain["vb"])


def test_loss_helpers_basic_identities():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert (approx_standard_normal_cdf(x) - 0.5 * (1 + torch.erf(x / math.sqrt(2)))).abs().max() < 1e-3
    mean = torch.randn(5, generator=torch.Generator().manual_seed(0))
    assert normal_kl(mean, torch.zeros(5), mean, torch.zeros(5)).abs().max() == 0
    # The 256 bins of one pixel carry the whole probability mass.
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_probs = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.3), torch.full_like(grid, -1.5))
    assert abs(log_probs.exp().sum().item() - 1) < 1e-9


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_teacher_forced_reproduces_reference(sampler_ref):
    diffusion = create_diffusion(timestep_respacing="20")
    assert diffusion.timestep_map == list(sampler_ref["timestep_map"])
    outputs, noises = sampler_ref["model_outputs"], sampler_ref["noises"]
    step = {"j": 0}
    recorded = {"pred_xstart": [], "sample": [], "k": []}

    def replay_unet(x, timesteps):
        j = step["j"]
        assert torch.equal(timesteps, sampler_ref["model_timesteps"][j])
        expected_input = sampler_ref["x_T"] if j == 0 else sampler_ref["x_steps"][j - 1]
        torch.testing.assert_close(x, expected_input, rtol=1e-5, atol=1e-5)
        step["j"] += 1
        return outputs[j]

    def record(k, model_output, out):
        recorded["k"].append(k)
        recorded["pred_xstart"].append(out["pred_xstart"])
        recorded["sample"].append(out["sample"])

    final = sample_images(
        replay_unet, diffusion, sampler_ref["x_T"].shape, seeds=None,
        x_T=sampler_ref["x_T"], noise_for_step=lambda k: noises[19 - k], on_step=record,
    )
    assert recorded["k"] == list(sampler_ref["step_indices"])
    sqrt_recip = torch.from_numpy(diffusion.tables.sqrt_recip_alphas_cumprod)
    for j, k in enumerate(recorded["k"]):
        assert_close_scaled(recorded["pred_xstart"][j], sampler_ref["pred_xstart"][j], 1e-5 * sqrt_recip[[k, k]])
        torch.testing.assert_close(recorded["sample"][j], sampler_ref["x_steps"][j], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, sampler_ref["final"], rtol=1e-5, atol=1e-5)
    # The last step adds no noise: the result is the clipped x_0 prediction.
    torch.testing.assert_close(final, recorded["pred_xstart"][-1], rtol=0, atol=1e-6)


def test_seeded_sampling_draw_order(torch_device):
    # x_T first, then one draw per step after the model call, including the last step.
    diffusion = create_diffusion(timestep_respacing="6")
    net = seeded_net(1).to(torch_device)
    shape = (2, 3, 8, 8)
    seeds = [11, 12]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    draws = [torch.stack([torch.randn(shape[1:], generator=g) for g in generators]) for _ in range(7)]
    replay = sample_images(net, diffusion, shape, seeds=None, x_T=draws[0],
                           noise_for_step=lambda k: draws[diffusion.num_timesteps - k])
    seeded = sample_images(net, diffusion, shape, seeds=seeds)
    assert seeded.device.type == torch_device.type and seeded.dtype == torch.float32
    assert torch.equal(seeded, replay)


class PerImageNet(nn.Module):
    """Runs the wrapped net one image at a time.

    CPU conv kernels may pick different algorithms for different batch sizes, which moves
    outputs by ~1e-7; evaluating per image removes that, so the sampler's own batch invariance
    can be checked bit for bit.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[i : i + 1], t[i : i + 1]) for i in range(x.shape[0])])


def test_per_image_seeds_are_batch_size_invariant():
    diffusion = create_diffusion(timestep_respacing="10")
    net = PerImageNet(seeded_net(2))
    net.train()
    seeds = [101, 7, 55, 3]
    batched = sample_images(net, diffusion, (4, 3, 8, 8), seeds=seeds)
    assert net.training, "sample_images must restore the module's training mode"
    singles = torch.cat([sample_images(net, diffusion, (1, 3, 8, 8), seeds=[s]) for s in seeds])
    assert torch.equal(batched, singles)
    assert batched.abs().max() <= 1
    assert not torch.allclose(batched[0], batched[1])
    # Same seed, same image, wherever it sits in the batch.
    swapped = sample_images(net, diffusion, (2, 3, 8, 8), seeds=[3, 101])
    assert torch.equal(swapped, batched[[3, 0]])


def test_to_uint8_truncates_like_reference():
    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 0.99999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


# ----------------------------------------------------------------------------------------------
# Timestep samplers


def warm_up(sampler: LossSecondMomentResampler, rounds: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        t = torch.arange(sampler.num_timesteps)
        losses = (t + 1.0) ** 1.5 * (1 + 0.2 * torch.rand(t.shape, generator=generator))
        sampler.update(t, losses)


def test_timestep_sampler_state_round_trip():
    for make in (lambda: UniformSampler(50), lambda: LossSecondMomentResampler(50)):
        original = make()
        if isinstance(original, LossSecondMomentResampler):
            warm_up(original, 12, seed=0)
            assert original.warmed_up
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        restored = make()
        restored.load_state_dict(torch.load(buffer, weights_only=True))

        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        for _ in range(3):
            t1, w1 = original.sample(32, g1, "cpu")
            t2, w2 = restored.sample(32, g2, "cpu")
            assert torch.equal(t1, t2) and torch.equal(w1, w2)
            assert t1.dtype == torch.int64 and w1.dtype == torch.float32
            losses = t1.double() * 0.01 + 1
            original.update(t1, losses)
            restored.update(t2, losses)
    with pytest.raises(PipelineError):
        UniformSampler(50).load_state_dict(LossSecondMomentResampler(50).state_dict())


def test_loss_second_moment_history_and_weights():
    T = 8
    sampler = create_timestep_sampler("loss-second-moment", T)
    generator = torch.Generator().manual_seed(0)
    warm_up(sampler, 9, seed=1)
    assert not sampler.warmed_up
    t, w = sampler.sample(64, generator, "cpu")
    assert torch.equal(w, torch.ones(64))

    # Two more rounds: ten per timestep, then the oldest drops out.
    sampler.update(torch.arange(T), torch.full((T,), 2.0))
    sampler.update(torch.arange(T), 100.0 * (torch.arange(T, dtype=torch.float64) + 1))
    assert sampler.warmed_up
    np.testing.assert_array_equal(sampler.loss_history[:, -1], 100.0 * (np.arange(T) + 1))
    np.testing.assert_array_equal(sampler.loss_history[:, -2], np.full(T, 2.0))

    # p_t proportional to the RMS of the history, mixed with 0.001 uniform; weights 1/(T p_t).
    rms = np.sqrt((sampler.loss_history**2).mean(axis=1))
    expected_p = 0.999 * rms / rms.sum() + 0.001 / T
    np.testing.assert_allclose(sampler.probabilities(), expected_p, rtol=1e-12)
    t, w = sampler.sample(1000, generator, "cpu")
    torch.testing.assert_close(w, torch.from_numpy(1 / (T * expected_p)).float()[t])

    # Importance weighting is unbiased: E_p[w f(t)] equals the uniform mean of f.
    f = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0, -4.0, 1.0, 5.0], dtype=torch.float64)
    n = 200_000
    t, w = sampler.sample(n, generator, "cpu")
    estimate = w.double() * f[t]
    standard_error = estimate.std().item() / math.sqrt(n)
    assert abs(estimate.mean().item() - f.mean().item()) < 5 * standard_error
    # And the draw is far from uniform: the high-loss end is picked more often.
    counts = torch.bincount(t, minlength=T)
    assert counts[-1] > 2 * counts[0]


# ----------------------------------------------------------------------------------------------
# Training


def test_training_loss_is_finite_and_falls(torch_device):
    diffusion = create_diffusion()
    net = seeded_net(3).to(torch_device)
    generator = torch.Generator().manual_seed(4)
    x_start = (torch.randint(0, 256, (4, 3, 8, 8), generator=generator).float() / 127.5 - 1).to(torch_device)
    noise = torch.randn(x_start.shape, generator=generator).to(torch_device)
    t = torch.tensor([0, 30, 400, 800], device=torch_device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = []
    for _ in range(50):
        terms = diffusion.training_losses(net, x_start, t, noise)
        loss = terms["loss"].mean()
        assert all(torch.isfinite(v).all() for v in terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


def test_fixed_variance_diffusion_has_mse_only():
    diffusion = create_diffusion(learn_sigma=False, noise_schedule="linear", timestep_respacing="10")
    net = seeded_net(5, learn_sigma=False)
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([0, 9])
    terms = diffusion.training_losses(net, x, t, torch.ones_like(x))
    assert set(terms) == {"mse", "loss"} and torch.equal(terms["loss"], terms["mse"])
    out = diffusion.p_mean_variance(net(x, diffusion.model_timesteps(t)), x, t, clip_denoised=True)
    assert torch.allclose(out["variance"][1], torch.tensor(diffusion.betas[9], dtype=torch.float32))
    assert torch.allclose(out["variance"][0], torch.tensor(diffusion.tables.posterior_variance[1], dtype=torch.float32))
