"""Low-pass-filter (LPF) flatness: the loss averaged over Gaussian weight noise.

LPF(theta) = E_{delta ~ N(0, sigma^2 I)} L(theta + delta), estimated with M draws (Bisla et al.
2022). Lower is flatter. For a quadratic L the expectation is exactly L(theta) + sigma^2/2 tr(H),
which the tests use.

Draw m is z_m ~ N(0, I) from the "directions" stream at counters (LPF_KIND, m) and delta_m =
sigma * z_m, so every model, every sigma of a sweep and every M share the same z_m (common random
numbers): a sweep differs only in scale, and M = 5 is a prefix of M = 100.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import seeding
from pipeline.flatness.weights import randn_like_params, restored, set_offset

# First counter of the "directions" stream for LPF draws (other measures use other kinds).
LPF_KIND = 0


@dataclasses.dataclass
class LPFResult:
    """LPF at one sigma.

    :param sigma: noise standard deviation per parameter.
    :param loss: L(theta), the unperturbed loss.
    :param draw_losses: (M,) L(theta + sigma z_m).
    """

    sigma: float
    loss: float
    draw_losses: np.ndarray

    @property
    def lpf(self) -> float:
        return float(np.mean(self.draw_losses))

    @property
    def difference(self) -> float:
        """LPF - L(theta); L(theta) is deterministic, so this has the LPF's standard error."""
        return self.lpf - self.loss

    @property
    def stderr(self) -> float:
        """Monte-Carlo standard error of the LPF estimate (0 with a single draw)."""
        m = len(self.draw_losses)
        return float(np.std(self.draw_losses, ddof=1) / math.sqrt(m)) if m > 1 else 0.0


def low_pass_loss(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor | float],
    sigmas: Sequence[float],
    draws: int,
    seed: int,
    on_evaluation: Callable[[], None] | None = None,
) -> list[LPFResult]:
    """LPF at each sigma with `draws` Monte-Carlo draws; parameters restored bit-exactly.

    Cost: 1 + len(sigmas) * draws calls of `loss_fn`, plus one parameter-sized draw per m.

    :param params: the parameters to perturb (all trainable ones for the LPF measure).
    :param loss_fn: evaluates the loss at the current parameters; called under no_grad.
    :param sigmas: noise scales, each evaluated on the same draws.
    :param draws: M >= 1.
    :param seed: base seed of the draws.
    :param on_evaluation: called after every loss evaluation (progress bars).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    tick = on_evaluation or (lambda: None)
    with torch.no_grad(), restored(params) as origin:
        base = float(loss_fn())
        tick()
        losses = np.zeros((len(sigmas), draws), dtype=np.float64)
        for m in range(draws):
            z = randn_like_params(params, seeding.generator(seed, LPF_KIND, m, stream="directions"))
            for s, sigma in enumerate(sigmas):
                set_offset(params, origin, [(float(sigma), z)])
                losses[s, m] = float(loss_fn())
                tick()
            del z
    return [LPFResult(sigma=float(sigma), loss=base, draw_losses=losses[s]) for s, sigma in enumerate(sigmas)]
