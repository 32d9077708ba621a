"""Flatness and robustness measures against closed forms, plus a smoke run of every stage.

The closed forms use a quadratic "network": parameters theta = (weight (R, S), bias (B,)) and
loss 0.5 (theta - c)^T A (theta - c) with a known symmetric A, so LPF, the perturbation curve,
the Hessian's spectrum and trace and the surface are all known exactly.
"""

from __future__ import annotations

import math
from argparse import Namespace

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.io.integrity import save_torch, seal_h5
from pipeline.cli import main as cli_main
from pipeline.config import DEFAULT_CONFIG
from pipeline.diffusion.gaussian import create_diffusion
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import (draw_triples, evaluation_loss, image_subset, loss_chunks,
                                       per_sample_loss)
from pipeline.flatness.exposure import exposure_gap, sampling_curve, training_curve
from pipeline.flatness.hessian import HessianOperator, hutchinson_trace, top_eigenvalue, twice_differentiable
from pipeline.flatness.lpf import filter_noise_scales, low_pass_loss
from pipeline.flatness.perturbation import loss_along_directions, unit_direction
from pipeline.flatness.surface import grid_coordinates, loss_surface, surface_directions
from pipeline.nn.presets import build_unet
from pipeline.stages.lpf import checked_scalings
from pipeline.stages.metric_common import resolve_model_settings, resolve_settings


class Quadratic(nn.Module):
    """loss() = 0.5 (theta - center)^T A (theta - center), theta = [weight.flatten(), bias]."""

    def __init__(self, matrix: torch.Tensor, theta: torch.Tensor, center: torch.Tensor,
                 rows: int = 4, bias: int = 3) -> None:
        super().__init__()
        cols = (theta.numel() - bias) // rows
        assert rows * cols + bias == theta.numel()
        self.register_buffer("matrix", matrix)
        self.register_buffer("center", center)
        self.weight = nn.Parameter(theta[: rows * cols].reshape(rows, cols).clone())
        self.bias = nn.Parameter(theta[rows * cols:].clone())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.weight.flatten(), self.bias])

    def loss(self) -> torch.Tensor:
        d = self.flat() - self.center
        return 0.5 * d @ self.matrix @ d


def spd_matrix(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a seeded random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic(matrix: torch.Tensor, at_center: bool, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    n = matrix.shape[0]
    center = torch.randn(n, generator=g, dtype=torch.float64)
    theta = center.clone() if at_center else center + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return Quadratic(matrix, theta, center)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_identical(model: nn.Module, saved: list[torch.Tensor]) -> None:
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))


EIGENVALUES = [10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


# ------------------------------------------------------------------------------------------
# LPF, perturbation, surface.

def test_lpf_equals_loss_plus_half_sigma_squared_trace() -> None:
    matrix = spd_matrix(EIGENVALUES, seed=1)
    model = quadratic(matrix, at_center=False)
    saved = snapshot(model)
    sigma, draws = 0.2, 2000
    (result,) = low_pass_loss(list(model.parameters()), model.loss, [sigma], draws, seed=3)
    expected = float(model.loss().detach()) + sigma ** 2 / 2 * float(torch.trace(matrix))
    assert result.loss == pytest.approx(float(model.loss().detach()), rel=1e-12)
    assert abs(result.lpf - expected) < 4 * result.stderr
    assert result.difference == pytest.approx(result.lpf - result.loss)
    assert_bit_identical(model, saved)

    # Same seed, same numbers; a sweep reuses the draws (sigma scales them) and M is a prefix.
    again = low_pass_loss(list(model.parameters()), model.loss, [0.1, sigma], 50, seed=3)
    assert np.array_equal(again[1].draw_losses, result.draw_losses[:50])
    assert not np.array_equal(again[0].draw_losses, again[1].draw_losses)


def test_filter_lpf_of_a_quadratic_is_loss_plus_half_sigma_squared_scaled_trace() -> None:
    # With delta = sigma r z, E L(theta + delta) = L(theta) + sigma^2 / 2 sum_i r_i^2 A_ii.
    matrix = spd_matrix(EIGENVALUES, seed=1)
    model = quadratic(matrix, at_center=False)
    sigma, draws = 0.2, 2000
    absolute, filtered = low_pass_loss(list(model.parameters()), model.loss, [sigma], draws, seed=3,
                                       scalings=("absolute", "filter"))
    r = torch.cat([s.flatten() for s in filter_noise_scales(list(model.parameters()))])
    expected = float(model.loss().detach()) + sigma ** 2 / 2 * float((r.square() * torch.diagonal(matrix)).sum())
    assert (absolute.scaling, filtered.scaling) == ("absolute", "filter")
    assert abs(filtered.lpf - expected) < 4 * filtered.stderr
    # The absolute half of a two-scaling run is the one-scaling run: same draws, same numbers.
    (alone,) = low_pass_loss(list(model.parameters()), model.loss, [sigma], draws, seed=3)
    assert np.array_equal(alone.draw_losses, absolute.draw_losses)


def test_filter_noise_has_the_stated_std_per_filter() -> None:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(3, 2, 3, generator=g) * torch.tensor([0.1, 1.0, 7.0])[:, None, None]
    weight[1] = 0.0                                    # an all-zero filter stays unperturbed
    bias = torch.tensor([0.0, 3.0, -4.0, 0.0])         # rms = 2.5; zero entries are perturbed too
    params = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    scales = filter_noise_scales(params)
    for k in range(3):
        assert torch.allclose(scales[0][k], torch.full((2, 3), float(weight[k].norm())))
    assert torch.allclose(scales[1], torch.full((4,), 2.5))

    # Record delta of every evaluation: absolute then filter, per draw (the loop order).
    deltas = []

    def record() -> float:
        deltas.append([(p.detach() - p0).clone() for p, p0 in zip(params, (weight, bias))])
        return 0.0

    sigma, draws = 0.1, 400
    low_pass_loss(params, record, [sigma], draws, seed=0, scalings=("absolute", "filter"))
    assert torch.equal(params[0].detach(), weight) and torch.equal(params[1].detach(), bias)
    absolute, filtered = deltas[1::2], deltas[2::2]
    # Common random numbers: the filter draw is the absolute draw times the multiplier (delta is
    # read back as (theta + delta) - theta, so up to float32 rounding at the size of theta).
    for a, f in zip(absolute[:5], filtered[:5]):
        for d_abs, d_fil, r, p0 in zip(a, f, scales, (weight, bias)):
            atol = 4 * torch.finfo(torch.float32).eps * float(p0.abs().max() + d_fil.abs().max())
            torch.testing.assert_close(d_fil, d_abs * r, rtol=1e-5, atol=atol)
    # And its empirical std per filter is sigma * ||W_k|| (2400 samples each: ~1.5 % standard error).
    stacked_w = torch.stack([f[0] for f in filtered])
    for k in range(3):
        expected = sigma * float(weight[k].norm())
        assert float(stacked_w[:, k].std()) == pytest.approx(expected, rel=0.08, abs=1e-12)
    assert float(torch.stack([f[1] for f in filtered]).std()) == pytest.approx(sigma * 2.5, rel=0.08)


class NormalisedTwoLayer(nn.Module):
    """conv 3x3 (2 -> 4) -> GroupNorm with one channel per group -> SiLU -> conv 1x1 (4 -> 1).

    Scaling output channel k of the first conv (its filter and bias) by c > 0 leaves the function
    unchanged: the per-channel normalisation removes the bias and divides the scale out (eps is
    tiny so that it does not break the symmetry).
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.first = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(4, 4, eps=1e-12)
        self.second = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            self.norm.weight.add_(0.3 * torch.randn(4))
            self.norm.bias.add_(0.3 * torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.silu(self.norm(self.first(x))))


def test_filter_lpf_is_invariant_to_rescaling_a_filter_and_absolute_lpf_is_not() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 5, 5, generator=g)
    target = torch.randn(6, 1, 5, 5, generator=g)
    original, rescaled = NormalisedTwoLayer(), NormalisedTwoLayer()
    with torch.no_grad():
        for k, c in ((0, 8.0), (2, 0.125)):
            rescaled.first.weight[k].mul_(c)
            rescaled.first.bias[k].mul_(c)

    def lpf(model: nn.Module) -> dict[str, np.ndarray]:
        def loss() -> float:
            return float(torch.nn.functional.mse_loss(model(x), target))
        results = low_pass_loss(list(model.parameters()), loss, [0.02, 0.1], 6, seed=4,
                                scalings=("absolute", "filter"))
        return {s: np.stack([r.draw_losses for r in results if r.scaling == s]) for s in ("absolute", "filter")}

    before, after = lpf(original), lpf(rescaled)
    with torch.no_grad():
        loss_before = float(torch.nn.functional.mse_loss(original(x), target))
        loss_after = float(torch.nn.functional.mse_loss(rescaled(x), target))
    assert loss_after == pytest.approx(loss_before, rel=1e-5)
    # Filter-normalised: every draw's loss is the same up to float rounding.
    np.testing.assert_allclose(after["filter"], before["filter"], rtol=1e-4)
    # Absolute: the rescaled filters see relatively smaller / larger noise, so the draws change.
    increase_before, increase_after = before["absolute"] - loss_before, after["absolute"] - loss_before
    assert np.abs(increase_after - increase_before).max() > 0.1 * np.abs(increase_before).max()


def test_lpf_scalings_are_checked() -> None:
    assert checked_scalings(["absolute", "filter"]) == ["absolute", "filter"]
    with pytest.raises(PipelineError, match="must include absolute"):
        checked_scalings(["filter"])
    with pytest.raises(PipelineError, match="unknown entries"):
        checked_scalings(["absolute", "per_filter"])
    with pytest.raises(PipelineError, match="twice"):
        checked_scalings(["absolute", "absolute"])
    with pytest.raises(ValueError, match="scalings"):
        low_pass_loss([nn.Parameter(torch.zeros(2))], lambda: 0.0, [0.1], 1, seed=0, scalings=("relative",))


def test_perturbation_curve_is_half_gamma_squared_curvature() -> None:
    matrix = spd_matrix(EIGENVALUES, seed=2)
    model = quadratic(matrix, at_center=True)
    params = list(model.parameters())
    saved = snapshot(model)
    radii = [0.0, 0.5, 1.0, 2.0]
    result = loss_along_directions(params, model.loss, radii, directions=5, seed=7)
    assert_bit_identical(model, saved)
    assert result.losses.shape == (5, 4)
    for k in range(5):
        u = torch.cat([d.flatten() for d in unit_direction(params, 7, k)])
        assert float(u.norm()) == pytest.approx(1.0, rel=1e-12)
        curvature = float(u @ matrix @ u)
        np.testing.assert_allclose(result.losses[k], 0.5 * np.square(radii) * curvature, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.relative_radii, np.array(radii) / float(model.flat().detach().norm()))
    np.testing.assert_allclose(result.difference_mean, result.mean - result.loss)


def test_directions_are_shared_by_models_of_one_shape() -> None:
    matrix = spd_matrix(EIGENVALUES, seed=2)
    first, second = quadratic(matrix, at_center=False, seed=0), quadratic(matrix, at_center=False, seed=5)
    p1, p2 = list(first.parameters()), list(second.parameters())
    assert not torch.equal(p1[0], p2[0])
    for k in range(3):
        assert all(torch.equal(a, b) for a, b in zip(unit_direction(p1, 11, k), unit_direction(p2, 11, k)))
    # Surface directions share the raw draw; each model rescales it to its own filter norms.
    for d1, d2 in zip(surface_directions(p1, 11), surface_directions(p2, 11)):
        raw1 = d1[0] / p1[0].detach().norm(dim=1, keepdim=True)
        raw2 = d2[0] / p2[0].detach().norm(dim=1, keepdim=True)
        torch.testing.assert_close(raw1, raw2)


def test_surface_directions_are_filter_normalised_and_ignore_biases() -> None:
    model = quadratic(spd_matrix(EIGENVALUES, seed=2), at_center=False)
    params = list(model.parameters())
    delta, eta = surface_directions(params, seed=4)
    for d in (delta, eta):
        torch.testing.assert_close(d[0].norm(dim=1), params[0].detach().norm(dim=1))
        assert torch.count_nonzero(d[1]) == 0
    kept = surface_directions(params, seed=4, ignore="none")
    assert torch.equal(kept[0][1], params[1].detach())


def test_surface_of_isotropic_quadratic_is_symmetric() -> None:
    curvature = 3.0
    model = quadratic(curvature * torch.eye(15, dtype=torch.float64), at_center=True)
    saved = snapshot(model)
    coords = grid_coordinates(5, 1.0)
    result = loss_surface(list(model.parameters()), model.loss, coords, coords, seed=9)
    assert_bit_identical(model, saved)
    losses = result.losses
    assert losses[2, 2] == 0.0
    np.testing.assert_allclose(losses, losses[::-1, ::-1], rtol=1e-12, atol=1e-14)  # f(a,b) = f(-a,-b)
    np.testing.assert_allclose(losses, losses.T, rtol=1e-6)                        # equal direction norms
    n1, n2 = result.direction_norms
    a, b = np.meshgrid(coords, coords, indexing="ij")
    expected = 0.5 * curvature * (a ** 2 * n1 ** 2 + b ** 2 * n2 ** 2 + 2 * a * b * result.direction_cosine * n1 * n2)
    np.testing.assert_allclose(losses, expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Hessian.

def test_hessian_vector_product_power_iteration_and_trace() -> None:
    matrix = spd_matrix(EIGENVALUES, seed=3)
    model = quadratic(matrix, at_center=False)
    params = list(model.parameters())
    saved = snapshot(model)
    hvp = HessianOperator(params, model.loss)

    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    hv = torch.cat([t.flatten() for t in hvp(v)])
    torch.testing.assert_close(hv, matrix @ torch.cat([t.flatten() for t in v]))

    eigen = top_eigenvalue(hvp, params, seed=0, max_iter=100, tol=1e-6)
    assert eigen.converged and eigen.eigenvalue == pytest.approx(10.0, rel=1e-4)
    assert top_eigenvalue(hvp, params, seed=0, max_iter=100, tol=1e-6).history.tolist() == eigen.history.tolist()

    trace = hutchinson_trace(hvp, params, seed=0, max_iter=400, tol=0.0)
    assert len(trace.samples) == 400 and not trace.converged
    assert abs(trace.trace - sum(EIGENVALUES)) < 4 * trace.stderr
    early = hutchinson_trace(hvp, params, seed=0, max_iter=100, tol=1e-3)
    assert early.samples.tolist() == trace.samples[: len(early.samples)].tolist()
    assert_bit_identical(model, saved)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_chunks_add_up() -> None:
    diagonal = torch.diag(torch.tensor(EIGENVALUES, dtype=torch.float64))
    model = quadratic(diagonal, at_center=False)
    params = list(model.parameters())
    trace = hutchinson_trace(HessianOperator(params, model.loss), params, seed=1, max_iter=10)
    assert trace.converged and len(trace.samples) == 2
    assert trace.trace == pytest.approx(sum(EIGENVALUES), rel=1e-12)

    # Two weighted chunks of the same loss give the single-chunk products.
    chunked = HessianOperator(params, [(model.loss, 0.25), (model.loss, 0.75)])
    single = HessianOperator(params, model.loss)
    v = [torch.ones_like(p) for p in params]
    for a, b in zip(chunked(v), single(v)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------
# Evaluation set and losses.

class ConvDenoiser(nn.Module):
    """A stand-in network: one conv to [eps, v] channels, ignoring t."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def synthetic_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_evaluation_set_is_seeded_prefix_stable_and_loss_matches_training_losses(torch_device) -> None:
    images = synthetic_images(40)
    indices = image_subset(len(images), 12, seed=5)
    assert np.array_equal(indices, image_subset(len(images), 12, seed=5))
    assert np.array_equal(indices[:6], image_subset(len(images), 6, seed=5))
    evalset = draw_triples(images[indices], indices, seed=5, num_timesteps=1000)
    small = draw_triples(images[indices[:6]], indices[:6], seed=5, num_timesteps=1000)
    assert torch.equal(evalset.prefix(6).noise, small.noise) and torch.equal(evalset.prefix(6).t, small.t)

    torch.manual_seed(0)
    model = ConvDenoiser(3).to(torch_device)
    diffusion = create_diffusion(steps=1000)
    x0, t, noise = evalset.batch(0, len(evalset), torch_device)
    reference = diffusion.training_losses(model, x0, t, noise)
    ours = per_sample_loss(model, diffusion, x0, t, noise, "mse+vb")
    torch.testing.assert_close(ours, reference["loss"])
    torch.testing.assert_close(per_sample_loss(model, diffusion, x0, t, noise, "mse"), reference["mse"])
    # Batch size changes nothing; the chunked closures sum to the same mean.
    whole = evaluation_loss(model, diffusion, evalset, batch_size=12)
    assert whole == pytest.approx(float(reference["loss"].detach().double().mean()), rel=1e-6)
    assert evaluation_loss(model, diffusion, evalset, batch_size=5) == pytest.approx(whole, rel=1e-6)
    chunks = loss_chunks(model, diffusion, evalset, chunk_size=5)
    assert sum(float(fn().detach()) * w for fn, w in chunks) == pytest.approx(whole, rel=1e-6)


# ------------------------------------------------------------------------------------------
# Exposure bias.

class TrueNoise(nn.Module):
    """Recovers eps exactly from x_t when every training image is black (x0 = -1)."""

    def __init__(self, diffusion) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.from_numpy(diffusion.alphas_cumprod))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(x.dtype)[:, None, None, None]
        eps = (x + abar.sqrt()) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def test_exposure_training_curve_of_true_noise_is_sqrt_dimension() -> None:
    base = create_diffusion(steps=1000)
    chain = create_diffusion(steps=1000, timestep_respacing="8")
    model = TrueNoise(base)
    images = np.zeros((120, 8, 8, 3), dtype=np.uint8)
    dim = 3 * 8 * 8
    curve = training_curve(model, chain, images, seed=1, batch_size=50)
    assert curve.l2.shape == (120, 8)
    # E||eps|| = sqrt(D - 1/2) + O(D^-3/2), so allow that bias beside the sampling error.
    bias = math.sqrt(dim) - math.sqrt(dim - 0.5)
    assert np.all(np.abs(curve.mean() - math.sqrt(dim)) < 4 * curve.stderr() + bias)
    assert np.all(np.abs(curve.mean(squared=True) - dim) < 4 * curve.stderr(squared=True))
    # Same seed, same numbers, whatever the batch size.
    assert np.array_equal(training_curve(model, chain, images, seed=1, batch_size=7).l2, curve.l2)


def test_exposure_sampling_curve_and_gap_are_reproducible() -> None:
    torch.manual_seed(0)
    model = ConvDenoiser(3)
    chain = create_diffusion(steps=1000, timestep_respacing="5")
    first = sampling_curve(model, chain, 6, (3, 8, 8), seed=2, batch_size=4)
    assert first.l2.shape == (6, 5) and np.all(first.l2 > 0)
    assert np.array_equal(sampling_curve(model, chain, 6, (3, 8, 8), seed=2, batch_size=6).l2, first.l2)
    training = training_curve(model, chain, synthetic_images(6), seed=2, batch_size=6)
    gap = exposure_gap(training, first)
    np.testing.assert_allclose(gap.per_t, first.mean() - training.mean())
    assert gap.mean == pytest.approx(gap.per_t.mean()) and gap.total == pytest.approx(gap.per_t.sum())


# ------------------------------------------------------------------------------------------
# The UNet: double backward through attention, and every stage's command line.

def test_twice_differentiable_switches_unet_attention_and_restores_it() -> None:
    model = build_unet("tiny")
    with twice_differentiable(model):
        assert model.attention_backend == "math"
    assert model.attention_backend == "sdpa"
    plain = ConvDenoiser(3)
    with twice_differentiable(plain) as same:
        assert same is plain


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    data = folder / "data.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=synthetic_images(12, size=16))
        seal_h5(f)  # as every writer of the pipeline does
    torch.manual_seed(0)
    model = build_unet("tiny")
    with torch.no_grad():
        # ADM zero-initialises its output layers; nudge every weight so eps_theta is not 0.
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = folder / "weights.pt"
    save_torch(model.state_dict(), weights)
    config = folder / "metrics.yaml"
    config.write_text("metrics:\n  lpf: {draws: 2, n_eval: 4, sigma_sweep: [0.005]}\n")
    return folder, data, weights, config


STAGE_RUNS = {
    "lpf": (["--batch-size", "4"],
            {"sigma", "loss", "lpf", "difference", "stderr", "draw_losses", "sweep", "absolute", "filter"}),
    "perturbation": (["--radii", "0", "1", "--directions", "2", "--n-eval", "4"],
                     {"radii", "relative_radii", "losses", "loss", "loss_mean", "loss_std",
                      "difference_mean", "difference_std", "parameter_norm"}),
    "surface": (["--grid", "3", "--n-eval", "4"],
                {"x", "y", "losses", "loss", "direction_norms", "direction_cosine"}),
    "hessian": (["--batch", "2", "--max-iter", "1"],
                {"loss", "top_eigenvalue", "eigenvalue_iterations", "eigenvalue_converged",
                 "eigenvalue_history", "trace", "trace_stderr", "trace_samples", "trace_converged",
                 "hessian_vector_products"}),
    "exposure": (["--n-images", "2", "--steps", "2", "3"],
                 {"reference_l2", "reference_sq", "steps", "steps2", "steps3"}),
}


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_stage_command_lines_write_their_keys(stage, stage_inputs, torch_device) -> None:
    """Each metric's command line, end to end; on CUDA under the pipeline's deterministic kernels,
    which refuse any operation that has no deterministic CUDA implementation."""
    folder, data, weights, config = stage_inputs
    flags, keys = STAGE_RUNS[stage]
    out = folder / f"{stage}-{torch_device.type}.h5"
    argv = [stage, "--weights", str(weights), "--data", str(data), "--preset", "tiny", "--out", str(out),
            "--device", torch_device.type, "--no-progress", "--config", str(DEFAULT_CONFIG), "--config", str(config), *flags]
    assert cli_main(argv) == 0
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == keys
        assert f.attrs["stage"] == stage and "settings_yaml" in f.attrs
        if stage != "exposure":
            assert f.attrs["loss_terms"] == "mse+vb"
        if stage == "hessian":
            assert f["hessian_vector_products"][()] == 2 and np.isfinite(f["top_eigenvalue"][()])
        if stage == "lpf":
            # Config metrics.lpf fills draws and the sweep; the sweep holds sigma too.
            assert f["draw_losses"].shape == (2,)
            assert f["sweep/sigma"][...].tolist() == [0.005, 0.01]
            # config.yaml asks for both scalings; the top level is the absolute one.
            assert f.attrs["scalings"] == "absolute,filter" and f.attrs["top_level_scaling"] == "absolute"
            assert "noise_filter" in f.attrs and f.attrs["noise"] == f.attrs["noise_absolute"]
            for key in ("lpf", "draw_losses", "sweep/draw_losses", "sweep/stderr"):
                assert np.array_equal(f[key][()], f[f"absolute/{key}"][()])
            assert f["filter/sweep/draw_losses"].shape == (2, 2)
            assert not np.array_equal(f["filter/draw_losses"][...], f["draw_losses"][...])
            assert set(f["filter"].keys()) == {"lpf", "difference", "stderr", "draw_losses", "sweep"}
        if stage == "exposure":
            assert f["steps3/training/l2_mean"].shape == (3,)
            assert np.all(f["steps3/training/l2_mean"][...] > 0) and np.all(f["steps3/sampling/l2"][...] > 0)
            assert set(f["steps3"].keys()) >= {"timesteps", "training", "sampling", "gap", "gap_l2_mean",
                                               "gap_l2_sum", "gap_sq_mean", "gap_sq_sum"}
            assert "gap_convention" in f.attrs
    if stage == "lpf":
        # Same seed, same numbers.
        again = folder / "lpf_again.h5"
        assert cli_main([*argv[:8], str(again), *argv[9:]]) == 0
        with h5py.File(out, "r") as a, h5py.File(again, "r") as b:
            assert np.array_equal(a["sweep/draw_losses"][...], b["sweep/draw_losses"][...])


def test_settings_and_network_resolution(tmp_path) -> None:
    defaults = {"sigma": 0.01, "draws": 100, "seed": 0}
    config = {"metrics": {"lpf": {"draws": 7, "sigma": 0.02}},
              "datasets": {"toy": {"preset": "tiny"}},
              "training": {"diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}}
    assert resolve_settings(Namespace(sigma=0.5), "lpf", defaults, config) == {"sigma": 0.5, "draws": 7, "seed": 0}
    with pytest.raises(PipelineError, match="unknown keys"):
        resolve_settings(Namespace(), "lpf", defaults, {"metrics": {"lpf": {"drawz": 1}}})

    weights = tmp_path / "weights_raw.pt"
    args = Namespace(weights=str(weights), preset=None, dataset="toy")
    settings, source = resolve_model_settings(args, config, in_channels=1)
    assert (settings.preset, settings.in_channels, source) == ("tiny", 1, "config datasets.toy")
    # The train stage's record beside the weights wins over the dataset entry; --preset over both.
    trained = {"preset": "demo", "diffusion": {"steps": 500, "noise_schedule": "linear", "learn_sigma": False}}
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f.attrs["settings_yaml"] = yaml.safe_dump(trained)
        seal_h5(f)  # as every writer of the pipeline does
    settings, source = resolve_model_settings(args, config, in_channels=3)
    assert settings.preset == "demo" and settings.diffusion["steps"] == 500 and source.endswith("train.h5")
    settings, source = resolve_model_settings(Namespace(weights=str(weights), preset="tiny", dataset=None),
                                              config, in_channels=3)
    assert settings.preset == "tiny" and settings.diffusion["noise_schedule"] == "linear" and source == "--preset"
    with pytest.raises(PipelineError, match="which network"):
        resolve_model_settings(Namespace(weights=str(tmp_path / "x" / "w.pt"), preset=None, dataset=None),
                               config, in_channels=3)


def test_inference_measures_run_channels_last_on_cpu_within_rounding_of_nchw(stage_inputs, tmp_path,
                                                                            monkeypatch) -> None:
    """LPF (as perturbation, surface and exposure) runs the UNet channels-last with
    ChannelsLastGroupNorm on the CPU, to fp32 rounding of the NCHW numbers; the Hessian stays NCHW."""
    from pipeline.nn.channels_last_norm import ChannelsLastGroupNorm
    from pipeline.stages import metric_common

    folder, data, weights, config = stage_inputs
    built = []
    convert = metric_common.channels_last_inference
    monkeypatch.setattr(metric_common, "channels_last_inference", lambda model: built.append(convert(model)) or built[-1])

    def run(stage: str, out, flags) -> None:
        assert cli_main([stage, "--weights", str(weights), "--data", str(data), "--preset", "tiny", "--out", str(out),
                         "--device", "cpu", "--no-progress", "--config", str(DEFAULT_CONFIG), "--config",
                         str(config), *flags]) == 0

    run("lpf", tmp_path / "last.h5", STAGE_RUNS["lpf"][0])
    assert len(built) == 1 and any(type(m) is ChannelsLastGroupNorm for m in built[0].modules())
    convs = [m.weight for m in built[0].modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    run("hessian", tmp_path / "hessian.h5", STAGE_RUNS["hessian"][0])
    assert len(built) == 1  # autograd through the norm: PyTorch's NCHW kernels
    monkeypatch.setattr(metric_common, "INFERENCE_MEASURES", ())
    run("lpf", tmp_path / "plain.h5", STAGE_RUNS["lpf"][0])
    with h5py.File(tmp_path / "last.h5") as last, h5py.File(tmp_path / "plain.h5") as plain:
        for key in ("loss", "sweep/draw_losses", "filter/sweep/draw_losses"):
            np.testing.assert_allclose(last[key][()], plain[key][()], rtol=1e-5)
