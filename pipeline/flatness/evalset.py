"""The fixed evaluation set of (x0, t, eps) triples that every loss-based measure shares.

Common random numbers: the images, timesteps and noises are a pure function of the seed and the
data file, never of the model, so two models (or two perturbations of one model) are compared on
exactly the same triples and their loss difference carries no sampling noise from the set.

* Images: the first N entries of a seeded permutation of the data set's rows ("eval_set" stream,
  no counters), so a smaller set is a prefix of a larger one.
* Triple i: t_i uniform over the diffusion's training steps and eps_i ~ N(0, I), both from the
  "eval_set" stream at counters (SAMPLE_KIND, i), so triple i does not depend on N either.

The loss is the per-sample training loss averaged uniformly (no timestep importance weights)
with the model in eval mode (dropout off), in float32. Input perturbation (DDPM-IP) is never
applied: every recipe is measured on the same loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline import seeding
from pipeline.data.hdf5 import read_images, read_info
from pipeline.diffusion.gaussian import GaussianDiffusion, mean_flat
from pipeline.errors import PipelineError

# Counter kinds inside the "eval_set" stream (exposure bias uses further kinds).
SAMPLE_KIND = 0
TERMS = ("mse+vb", "mse")


def image_subset(num_available: int, n: int, seed: int) -> np.ndarray:
    """The first n rows of a seeded permutation of range(num_available), as int64 (n,)."""
    if n < 1 or n > num_available:
        raise PipelineError(f"asked for {n} evaluation images but the data set holds {num_available}; "
                            f"choose 1 <= n <= {num_available}.")
    order = torch.randperm(num_available, generator=seeding.generator(seed, stream="eval_set"))
    return order[:n].numpy().astype(np.int64)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] via x / 127.5 - 1."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0).contiguous()


@dataclasses.dataclass
class EvaluationSet:
    """N fixed triples.

    :param indices: (N,) int64 rows of the data set.
    :param images: (N, H, W, C) uint8 x0, kept compact and converted batch by batch.
    :param t: (N,) int64 timesteps in [0, num_timesteps).
    :param noise: (N, C, H, W) float32 eps.
    """

    indices: np.ndarray
    images: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    seed: int
    num_timesteps: int

    def __len__(self) -> int:
        return len(self.indices)

    def prefix(self, n: int) -> "EvaluationSet":
        """The first n triples (equal to building a set of size n with the same seed)."""
        if n < 1 or n > len(self):
            raise PipelineError(f"a batch of {n} triples does not fit an evaluation set of {len(self)}.")
        return EvaluationSet(self.indices[:n], self.images[:n], self.t[:n], self.noise[:n],
                             self.seed, self.num_timesteps)

    def batch(self, start: int, stop: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """(x0 (n, C, H, W) in [-1, 1], t (n,), eps (n, C, H, W)) for triples start..stop-1."""
        return (to_model_range(self.images[start:stop]).to(device),
                self.t[start:stop].to(device), self.noise[start:stop].to(device))

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(start, min(start + batch_size, len(self)), device)

    def describe(self) -> dict:
        """What identifies the set, for provenance."""
        return {"n": len(self), "seed": self.seed, "num_timesteps": self.num_timesteps,
                "t_distribution": "uniform over training steps", "image_selection": "seeded permutation prefix"}


def draw_triples(images: np.ndarray | torch.Tensor, indices: np.ndarray, seed: int,
                 num_timesteps: int) -> EvaluationSet:
    """Attach timesteps and noises to already selected uint8 (N, H, W, C) images."""
    images = torch.as_tensor(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise PipelineError(f"evaluation images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}.")
    n, height, width, channels = images.shape
    t = torch.empty(n, dtype=torch.int64)
    noise = torch.empty((n, channels, height, width), dtype=torch.float32)
    for i in range(n):
        g = seeding.generator(seed, SAMPLE_KIND, i, stream="eval_set")
        t[i] = torch.randint(0, num_timesteps, (1,), generator=g)[0]
        noise[i] = torch.randn((channels, height, width), generator=g)
    return EvaluationSet(np.asarray(indices, dtype=np.int64), images, t, noise, int(seed), int(num_timesteps))


def load_evaluation_set(data_path: str | Path, n: int, seed: int, num_timesteps: int) -> EvaluationSet:
    """Build the evaluation set of size n from a prepared data.h5."""
    available = read_info(data_path)["shape"][0]
    indices = image_subset(available, n, seed)
    return draw_triples(read_images(data_path, indices), indices, seed, num_timesteps)


# ------------------------------------------------------------------------------------------
# Losses on the set.

def effective_terms(diffusion: GaussianDiffusion, terms: str) -> str:
    """The loss terms actually used: "mse+vb" falls back to "mse" without a learned variance."""
    if terms not in TERMS:
        raise PipelineError(f"loss terms must be one of {TERMS}, got {terms!r}.")
    return terms if diffusion.learn_sigma else "mse"


def per_sample_loss(model: nn.Module | Callable, diffusion: GaussianDiffusion, x0: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, terms: str) -> torch.Tensor:
    """Per-sample loss (n,) whose value is the training loss and whose graph is its true gradient.

    The training objective stops the VB term's gradient from reaching eps (so VB trains only the
    variance); that makes its second derivative a non-symmetric surrogate. Here the VB term sees
    the raw output, so double backward gives the Hessian of the very function whose value the
    other measures average. Values equal `diffusion.training_losses`.
    """
    terms = effective_terms(diffusion, terms)
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, diffusion.model_timesteps(t))
    eps, _ = diffusion.split_model_output(output, x_t)
    loss = mean_flat((noise - eps) ** 2)
    if terms == "mse+vb":
        vb = diffusion.vb_terms_bpd(output, x0, x_t, t)
        if diffusion.loss_type == "rescaled_mse":
            vb = vb * (diffusion.num_timesteps / 1000.0)
        loss = loss + vb
    return loss


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def evaluation_loss(model: nn.Module, diffusion: GaussianDiffusion, evalset: EvaluationSet,
                    batch_size: int, terms: str = "mse+vb") -> float:
    """Mean per-sample training loss over the set: eval mode, float32, no grad.

    Cost: ceil(N / batch_size) forward passes of batch_size.
    """
    terms = effective_terms(diffusion, terms)
    device = _device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for x0, t, noise in evalset.batches(batch_size, device):
                out = diffusion.training_losses(model, x0, t, noise)
                per_sample = out["loss"] if terms == "mse+vb" else out["mse"]
                total += float(per_sample.double().sum())
    finally:
        model.train(was_training)
    return total / len(evalset)


def loss_chunks(model: nn.Module, diffusion: GaussianDiffusion, evalset: EvaluationSet,
                chunk_size: int, terms: str = "mse+vb") -> list[tuple[Callable[[], torch.Tensor], float]]:
    """Differentiable closures over chunks of the set, weighted so they sum to the set's mean loss.

    For the Hessian: each closure returns the mean loss of its chunk (grad enabled); its weight
    is chunk length / N. The caller puts the model in eval mode.
    """
    device = _device(model)
    chunks = []
    for start in range(0, len(evalset), chunk_size):
        stop = min(start + chunk_size, len(evalset))

        def closure(start: int = start, stop: int = stop) -> torch.Tensor:
            x0, t, noise = evalset.batch(start, stop, device)
            return per_sample_loss(model, diffusion, x0, t, noise, terms).mean()

        chunks.append((closure, (stop - start) / len(evalset)))
    return chunks
