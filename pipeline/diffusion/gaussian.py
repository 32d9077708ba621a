"""The Gaussian diffusion process of ADM (openai/guided-diffusion), as pure tensor maths.

The network is never hidden inside this class: `p_mean_variance` takes the model *output*, and
callers run the network themselves on `model_timesteps(t)`. That keeps respacing explicit (the
respaced index k drives every table, the original timestep timestep_map[k] drives the network)
and lets the sampler, the trainer and the exposure-bias metric share one set of formulas.

Configuration covered: epsilon prediction; variance either learned as an interpolation between
beta_k and the clipped posterior variance ("learned range", learn_sigma=True) or fixed to the
"large" choice (learn_sigma=False); loss "rescaled_mse" (hybrid MSE + VB/1000-scaled) or "mse".
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from pipeline.diffusion.schedule import DiffusionTables, named_beta_schedule, respace_betas, space_timesteps
from pipeline.errors import PipelineError

LOSS_TYPES = ("rescaled_mse", "mse")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """A K-step Gaussian diffusion, optionally a respaced sub-chain of a longer one.

    :param betas: float64 array (K,), the betas of *this* chain (already respaced if respacing).
    :param timestep_map: K original timesteps, timestep_map[k] being what the network sees at
        chain index k; None means the identity (no respacing).
    :param learn_sigma: the model outputs 2C channels [eps, v] with a learned-range variance;
        otherwise C channels of eps and the fixed "large" variance (beta_k, with beta_0 replaced
        by the posterior variance at 1).
    :param loss_type: "rescaled_mse" multiplies the VB term by K/1000; "mse" leaves it unscaled.
    :param original_num_timesteps: T of the chain that timestep_map indexes (metadata and a
        bound check); defaults to K when timestep_map is None.
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        timestep_map: Sequence[int] | None = None,
        learn_sigma: bool = True,
        loss_type: str = "rescaled_mse",
        original_num_timesteps: int | None = None,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise PipelineError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
        self.tables = DiffusionTables.from_betas(betas)
        self.learn_sigma = bool(learn_sigma)
        self.loss_type = loss_type

        num_timesteps = self.tables.num_timesteps
        if timestep_map is None:
            self.timestep_map = list(range(num_timesteps))
            self.original_num_timesteps = int(original_num_timesteps or num_timesteps)
        else:
            self.timestep_map = [int(t) for t in timestep_map]
            if original_num_timesteps is None:
                raise ValueError("original_num_timesteps is required with a timestep_map")
            self.original_num_timesteps = int(original_num_timesteps)
        if len(self.timestep_map) != num_timesteps:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {num_timesteps} betas")
        if any(b <= a for a, b in zip(self.timestep_map, self.timestep_map[1:])):
            raise ValueError("timestep_map must be strictly increasing")
        if self.timestep_map[0] < 0 or self.timestep_map[-1] >= self.original_num_timesteps:
            raise ValueError(f"timestep_map must lie in 0..{self.original_num_timesteps - 1}")
        self.is_respaced = self.timestep_map != list(range(self.original_num_timesteps))

        # Extra float64 tables the variance models need, beside the 13 standard ones.
        t = self.tables
        self._extra_tables = {
            "log_betas": np.log(t.betas),
            "fixed_large_variance": np.append(t.posterior_variance[1], t.betas[1:]),
            "fixed_large_log_variance": np.log(np.append(t.posterior_variance[1], t.betas[1:])),
        }
        # Float64 tables (and the timestep map) uploaded once per device, on first use.
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    # Bookkeeping

    @property
    def num_timesteps(self) -> int:
        """K, the number of steps of this chain."""
        return self.tables.num_timesteps

    @property
    def betas(self) -> np.ndarray:
        return self.tables.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.tables.alphas_cumprod

    def _on_device(self, name: str, device: torch.device) -> torch.Tensor:
        cache = self._device_cache.setdefault(device, {})
        if name not in cache:
            if name == "timestep_map":
                cache[name] = torch.tensor(self.timestep_map, dtype=torch.int64, device=device)
            else:
                array = self._extra_tables[name] if name in self._extra_tables else getattr(self.tables, name)
                cache[name] = torch.from_numpy(array).to(device)
        return cache[name]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at indices t (N,), shaped (N, 1, ..., 1) to broadcast against `like`.

        The float64 table is indexed first and cast after, as in the reference. The cast goes to
        float32, or float64 for float64 inputs; half-precision inputs get float32 tables (so the
        arithmetic promotes to float32 exactly as the reference's float32 tables do).
        """
        values = self._on_device(name, t.device)[t]
        dtype = torch.promote_types(like.dtype, torch.float32)
        return values.to(dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map chain indices k (N,) int64 to the original timesteps (N,) int64 the network takes."""
        if not self.is_respaced:
            return t
        return self._on_device("timestep_map", t.device)[t]

    # ------------------------------------------------------------------------------------------
    # Forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise.

        :param x_start: (N, C, H, W) clean images x_0.
        :param t: (N,) int64 chain indices.
        :param noise: (N, C, H, W) standard normal noise.
        :return: (N, C, H, W) x_t.
        """
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and x_start {tuple(x_start.shape)} differ in shape")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

        :param x_start: (N, C, H, W) x_0 (true or predicted).
        :param x_t: (N, C, H, W) noisy images at chain index t.
        :param t: (N,) int64 chain indices.
        :return: mean (N, C, H, W); variance and log-variance (N, 1, 1, 1) broadcast to
            (N, C, H, W).
        """
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------------
    # Reverse process

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps; all tensors (N, C, H, W), t (N,)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def split_model_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split (N, 2C, H, W) into eps and v (each (N, C, H, W)), or (N, C, H, W) into eps, None."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected \
                or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not fit x_t {tuple(x_t.shape)} "
                f"(expected {expected} channels with learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            eps, v = torch.split(model_output, channels, dim=1)
            return eps, v
        return model_output, None

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool
    ) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t) given the network's output at (x_t, model_timesteps(t)).

        :param model_output: (N, 2C, H, W) [eps, v] with learned sigma, else (N, C, H, W) eps.
        :param x_t: (N, C, H, W) current state.
        :param t: (N,) int64 chain indices.
        :param clip_denoised: clamp the predicted x_0 to [-1, 1] before forming the mean.
        :return: dict of (N, C, H, W) tensors "mean", "variance", "log_variance", "pred_xstart".
        """
        eps, v = self.split_model_output(model_output, x_t)
        if self.learn_sigma:
            # Interpolate in log space between the smallest (posterior) and largest (beta)
            # sensible variances; frac is deliberately not clamped, like the reference.
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._extract("fixed_large_variance", t, x_t).expand_as(x_t)
            log_variance = self._extract("fixed_large_log_variance", t, x_t).expand_as(x_t)

        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------------------------------
    # Training objective

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One term of the variational bound per sample, in bits per dimension, shape (N,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized-Gaussian
        NLL of x_0 for t == 0, both with the *unclipped* x_0 prediction.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        input_noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample hybrid loss terms for one batch.

        The network sees x_t = q_sample(x_start, t, input_noise) (input_noise defaults to
        `noise`) and is regressed onto `noise`. Passing input_noise = noise + gamma * xi is
        DDPM-IP's input perturbation: the target stays the unperturbed noise and the VB term
        uses the perturbed x_t, with no second code path.

        :param model: called as model(x_t, model_timesteps(t), **model_kwargs), returning
            (N, 2C, H, W) with learned sigma or (N, C, H, W) otherwise.
        :param x_start: (N, C, H, W) clean images in [-1, 1].
        :param t: (N,) int64 chain indices.
        :param noise: (N, C, H, W) the regression target eps.
        :param input_noise: (N, C, H, W) noise used to build x_t; None means `noise`.
        :return: dict of (N,) tensors: "mse" (mean over C, H, W of (noise - eps)^2), "vb"
            (learned sigma only; bits/dim, gradient reaching only the v channels, times K/1000
            for "rescaled_mse") and "loss" = mse + vb.
        """
        x_t = self.q_sample(x_start, t, noise if input_noise is None else input_noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self.split_model_output(model_output, x_t)

        terms: dict[str, torch.Tensor] = {}
        if self.learn_sigma:
            # The VB term must train only the variance: the mean is left to the MSE term.
            frozen_output = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen_output, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                # The MSE term is a per-step average while VB estimates a sum over K steps;
                # K/1000 is improved-DDPM's lambda = 0.001 times that sum.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------------------------------
    # Respacing

    def respaced(self, section_counts: str | Sequence[int]) -> "GaussianDiffusion":
        """A shorter chain over this one's steps (see `space_timesteps` for `section_counts`).

        Betas are rebuilt from the kept alphas_cumprod, so every table is that of the short
        chain; timestep_map composes with this chain's own map.
        """
        kept = space_timesteps(self.num_timesteps, section_counts)
        new_betas, kept = respace_betas(self.tables.betas, kept)
        return GaussianDiffusion(
            new_betas,
            timestep_map=[self.timestep_map[k] for k in kept],
            learn_sigma=self.learn_sigma,
            loss_type=self.loss_type,
            original_num_timesteps=self.original_num_timesteps,
        )


def create_diffusion(
    steps: int = 1000,
    noise_schedule: str = "cosine",
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = True,
    timestep_respacing: str | Sequence[int] = "",
) -> GaussianDiffusion:
    """Build the diffusion like guided-diffusion's create_gaussian_diffusion (epsilon prediction).

    An empty `timestep_respacing` keeps all `steps`; otherwise see `space_timesteps`.
    """
    base = GaussianDiffusion(
        named_beta_schedule(noise_schedule, steps),
        learn_sigma=learn_sigma,
        loss_type="rescaled_mse" if rescale_learned_sigmas else "mse",
    )
    if not timestep_respacing:
        return base
    return base.respaced(timestep_respacing)
