"""Every random draw of one training step, as a function of (seed, step) alone.

Each draw is made for the global batch and then sliced, so sample j of a step gets the same
numbers however many data-parallel processes share the batch, and a resumed run continues with
the numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import torch

from pipeline import seeding


def draw_step(batches, sampler, seed: int, step: int, ip_gamma: float, device: torch.device):
    """This process's share of the batch and of every draw of one step, functions of (seed, step).

    `batches` is a pipeline.data.loader.TrainingBatches (or anything with its batch(step),
    batch_size, local_batch_size and rank). Returns x0 (B, C, H, W) in [-1, 1], timesteps t (B,),
    importance weights (B,), the target noise eps, and the noise that builds x_t: eps + gamma * xi
    for input perturbation (DDPM-IP), else None (x_t from eps itself); B is the process's share
    of the global batch.
    """
    share = slice(batches.rank * batches.local_batch_size, (batches.rank + 1) * batches.local_batch_size)
    x0 = batches.batch(step).to(device, non_blocking=True)
    t, weights = sampler.sample(batches.batch_size, seeding.generator(seed, step, stream="timesteps"), device)
    t, weights = t[share], weights[share]
    noise = _randn_share(x0, batches.batch_size, share, seeding.generator(seed, step, stream="noise"))
    input_noise = None
    if ip_gamma:
        xi = _randn_share(x0, batches.batch_size, share,
                          seeding.generator(seed, step, stream="input_perturbation"))
        input_noise = noise + ip_gamma * xi
    return x0, t, weights, noise, input_noise


def _randn_share(x: torch.Tensor, global_batch: int, share: slice, generator: torch.Generator) -> torch.Tensor:
    """This process's rows of Gaussian noise drawn for the whole global batch, shaped like x.

    Drawn on the CPU generator, so CPU and CUDA runs see the same numbers.
    """
    noise = torch.randn((global_batch, *x.shape[1:]), generator=generator, dtype=torch.float32)
    return noise[share].to(x.device, non_blocking=True)


class RandomImages:
    """Uniform random images in TrainingBatches' interface (one process), for timing a step
    without a data file: `plan --calibrate` and bench/train_step.py."""

    rank = 0

    def __init__(self, batch_size: int, channels: int, image_size: int, seed: int = 0) -> None:
        self.batch_size = self.local_batch_size = batch_size
        self.channels, self.image_size, self.seed = channels, image_size, seed

    def batch(self, step: int) -> torch.Tensor:
        """(B, C, H, W) float32 in [-1, 1] on the CPU, a function of (seed, step)."""
        generator = torch.Generator().manual_seed(self.seed + step)  # timing only: any numbers do
        shape = (self.batch_size, self.channels, self.image_size, self.image_size)
        return torch.rand(shape, generator=generator) * 2 - 1
