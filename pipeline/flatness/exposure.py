"""Exposure bias: the norm of the predicted noise on training inputs vs along the sampling chain.

Following Ning et al. (2024, ADM-ES), for every index k of a respaced K-step chain:

* training curve: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps from real images x0 and fresh
  eps; record ||eps_theta(x_t, k)||.
* sampling curve: run the model's own ancestral chain from x_K ~ N(0, I); record
  ||eps_theta(x_k, k)|| at the state it actually reaches.

The norm is the per-image Euclidean norm over C x H x W (not squared, not divided by the
dimension: ADM-ES's convention); its square is kept too because the flatness paper words it
both ways. An exact N(0, I) prediction has norm close to sqrt(C H W) (55.4 for 3 x 32 x 32).
Every draw is a function of (seed, K, image index): image i's training noises come from the
"eval_set" stream at counters (TRAINING_KIND, K, i), its sampling chain from a seed derived at
(SAMPLING_KIND, K, i), so results do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import seeding
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.diffusion.sampler import sample_images
from pipeline.flatness.evalset import to_model_range

TRAINING_KIND = 1
SAMPLING_KIND = 2
GAP_CONVENTION = ("gap = sampling - training of the per-t mean L2 norm of the predicted eps over "
                  "C x H x W (ADM-ES convention); gap_mean averages it over the K respaced steps, "
                  "gap_sum adds it up; the *_sq variants use the squared norm")


def eps_norms(eps: torch.Tensor) -> np.ndarray:
    """Per-image Euclidean norm over (C, H, W) of (n, C, H, W) -> float64 (n,)."""
    return eps.detach().double().flatten(1).norm(dim=1).cpu().numpy()


def reference_norm(image_shape: Sequence[int]) -> float:
    """sqrt(C H W): the norm scale of an exact standard-normal prediction."""
    return math.sqrt(float(np.prod(image_shape)))


@dataclasses.dataclass
class ExposureCurve:
    """Norms of the predicted eps for N images at each of the K chain indices.

    :param l2: (N, K) float64, l2[i, k] = ||eps_theta|| of image i at chain index k.
    """

    l2: np.ndarray

    @property
    def squared(self) -> np.ndarray:
        return self.l2 ** 2

    @staticmethod
    def _stderr(values: np.ndarray) -> np.ndarray:
        n = values.shape[0]
        return values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(values.shape[1:], np.nan)

    def mean(self, squared: bool = False) -> np.ndarray:
        """(K,) mean over images."""
        return (self.squared if squared else self.l2).mean(axis=0)

    def stderr(self, squared: bool = False) -> np.ndarray:
        """(K,) standard error of the per-t mean over images."""
        return self._stderr(self.squared if squared else self.l2)

    def mean_over_t_stderr(self, squared: bool = False) -> float:
        """Standard error of the mean over t and images, counting each image's K values as one
        correlated unit (a chain, or one x0 under K noises)."""
        per_image = (self.squared if squared else self.l2).mean(axis=1, keepdims=True)
        return float(self._stderr(per_image)[0])


@dataclasses.dataclass
class ExposureGap:
    """sampling - training, per t and summarised over t (each with standard errors)."""

    per_t: np.ndarray
    per_t_stderr: np.ndarray
    mean: float
    mean_stderr: float
    total: float
    total_stderr: float


def exposure_gap(training: ExposureCurve, sampling: ExposureCurve, squared: bool = False) -> ExposureGap:
    """The gap between two independent curves over the same K steps."""
    per_t = sampling.mean(squared) - training.mean(squared)
    per_t_stderr = np.sqrt(sampling.stderr(squared) ** 2 + training.stderr(squared) ** 2)
    steps = per_t.shape[0]
    mean_stderr = math.hypot(sampling.mean_over_t_stderr(squared), training.mean_over_t_stderr(squared))
    return ExposureGap(per_t=per_t, per_t_stderr=per_t_stderr, mean=float(per_t.mean()),
                       mean_stderr=mean_stderr, total=float(per_t.sum()), total_stderr=mean_stderr * steps)


def _device(model: nn.Module | Callable) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


def training_curve(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    images: np.ndarray | torch.Tensor,
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> ExposureCurve:
    """Norm of eps_theta on forward-process inputs from real images, at every chain index.

    Cost: N * K image forward passes (ceil(N / batch_size) * K calls).

    :param diffusion: the (respaced) K-step chain; the model sees model_timesteps(k).
    :param images: uint8 (N, H, W, C) training images.
    :param on_batch: called with the number of images finished after each image batch.
    """
    images = torch.as_tensor(np.ascontiguousarray(images))
    count, steps = images.shape[0], diffusion.num_timesteps
    device = _device(model)
    l2 = np.empty((count, steps), dtype=np.float64)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                x0 = to_model_range(images[start:stop]).to(device)
                generators = [seeding.generator(seed, TRAINING_KIND, steps, i, stream="eval_set")
                              for i in range(start, stop)]
                # Chain order (k = K-1 first), like sampling, so each image's draws are fixed.
                for k in range(steps - 1, -1, -1):
                    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
                    t = torch.full((stop - start,), k, dtype=torch.int64, device=device)
                    x_t = diffusion.q_sample(x0, t, noise)
                    eps, _ = diffusion.split_model_output(model(x_t, diffusion.model_timesteps(t)), x_t)
                    l2[start:stop, k] = eps_norms(eps)
                if on_batch is not None:
                    on_batch(stop - start)
    finally:
        if was_training:
            model.train()
    return ExposureCurve(l2=l2)


def sampling_curve(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    count: int,
    image_shape: Sequence[int],
    seed: int,
    batch_size: int,
    clip_denoised: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> ExposureCurve:
    """Norm of eps_theta along the model's own ancestral chain, at every chain index.

    Cost: count * K image forward passes (ceil(count / batch_size) * K calls).

    :param image_shape: (C, H, W).
    """
    steps = diffusion.num_timesteps
    channels = int(image_shape[0])
    l2 = np.empty((count, steps), dtype=np.float64)
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        seeds = [seeding.derive_seed(seed, SAMPLING_KIND, steps, i, stream="eval_set") for i in range(start, stop)]

        def record(k: int, model_output: torch.Tensor, _out: dict, start: int = start, stop: int = stop) -> None:
            l2[start:stop, k] = eps_norms(model_output[:, :channels])

        sample_images(model, diffusion, (stop - start, *image_shape), seeds, clip_denoised=clip_denoised,
                      on_step=record)
        if on_batch is not None:
            on_batch(stop - start)
    return ExposureCurve(l2=l2)
