"""Loss under perturbation: L(theta + gamma u) along random unit directions u (Cha et al. 2021).

The local flatness F_gamma = E_{||u|| = 1} [L(theta + gamma u) - L(theta)] is estimated with K
directions uniform on the sphere of the flattened parameter vector (u = z / ||z||, z ~ N(0, I),
no filter normalisation). Direction k comes from the "directions" stream at counters
(PERTURBATION_KIND, k) and depends only on the parameter shapes, so every model of one
architecture is probed along the same directions. Directions are drawn one at a time: memory is
two copies of the parameters (origin and one direction), whatever K is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import seeding
from pipeline.flatness.weights import TensorList, norm, parameter_norm, randn_like_params, restored, set_offset

PERTURBATION_KIND = 1


def unit_direction(params: Sequence[torch.Tensor], seed: int, index: int) -> TensorList:
    """Direction `index`: a Gaussian draw over all of `params`, scaled to unit Euclidean norm."""
    z = randn_like_params(params, seeding.generator(seed, PERTURBATION_KIND, index, stream="directions"))
    length = norm(z)
    return [t.div_(length) for t in z]


@dataclasses.dataclass
class PerturbationResult:
    """Losses on a radius grid along K directions.

    :param radii: (R,) perturbation norms gamma.
    :param losses: (K, R) L(theta + gamma_r u_k).
    :param loss: L(theta).
    :param parameter_norm: ||theta|| over the perturbed parameters.
    """

    radii: np.ndarray
    losses: np.ndarray
    loss: float
    parameter_norm: float

    @property
    def relative_radii(self) -> np.ndarray:
        """gamma / ||theta||."""
        return self.radii / self.parameter_norm if self.parameter_norm > 0 else np.full_like(self.radii, np.nan)

    @property
    def differences(self) -> np.ndarray:
        """(K, R) L(theta + gamma u_k) - L(theta)."""
        return self.losses - self.loss

    @property
    def mean(self) -> np.ndarray:
        return self.losses.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """(R,) sample standard deviation over directions (ddof 1; 0 for a single direction)."""
        return _std(self.losses)

    @property
    def difference_mean(self) -> np.ndarray:
        return self.differences.mean(axis=0)

    @property
    def difference_std(self) -> np.ndarray:
        return _std(self.differences)


def _std(values: np.ndarray) -> np.ndarray:
    if values.shape[0] < 2:
        return np.zeros(values.shape[1:])
    return values.std(axis=0, ddof=1)


def loss_along_directions(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor | float],
    radii: Sequence[float],
    directions: int,
    seed: int,
    on_evaluation: Callable[[], None] | None = None,
) -> PerturbationResult:
    """L(theta + gamma u_k) for every radius and direction; parameters restored bit-exactly.

    Cost: 1 + K * (number of non-zero radii) calls of `loss_fn` (radius 0 reuses L(theta)).

    :param params: the parameters to perturb.
    :param loss_fn: evaluates the loss at the current parameters; called under no_grad.
    :param radii: perturbation norms gamma >= 0.
    :param directions: K >= 1.
    :param seed: base seed of the directions.
    """
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    radii = np.asarray(radii, dtype=np.float64)
    if np.any(radii < 0):
        raise ValueError("radii must be >= 0")
    tick = on_evaluation or (lambda: None)
    with torch.no_grad(), restored(params) as origin:
        theta_norm = parameter_norm(params)
        base = float(loss_fn())
        tick()
        losses = np.full((directions, len(radii)), base, dtype=np.float64)
        for k in range(directions):
            u = unit_direction(params, seed, k)
            for r, gamma in enumerate(radii):
                if gamma == 0.0:
                    continue
                set_offset(params, origin, [(float(gamma), u)])
                losses[k, r] = float(loss_fn())
                tick()
            del u
    return PerturbationResult(radii=radii, losses=losses, loss=base, parameter_norm=theta_norm)
