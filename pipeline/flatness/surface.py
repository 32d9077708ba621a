"""2-D loss surface f(a, b) = L(theta + a delta + b eta) along filter-normalised directions.

Li et al. (2018): delta and eta are Gaussian draws of the parameters' shapes; in every tensor with
two or more dimensions, each slice along the first (output) dimension is rescaled to the norm of
the matching weight slice, so the surface is comparable between networks whose filters differ
in scale. Tensors with at most one dimension (biases, normalisation affine parameters) get a
zero direction ("biasbn" ignored) or, with ignore="none", a copy of their values.

The raw draws come from the "directions" stream at counters (SURFACE_KIND, axis) and depend only
on the shapes: models of one architecture share them, and each model rescales them to its own
filters, which is what makes their panels comparable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import seeding
from pipeline.flatness.weights import TensorList, dot, norm, randn_like_params, restored, set_offset

SURFACE_KIND = 2
IGNORE_CHOICES = ("biasbn", "none")
# Guards the rescale of a slice whose random draw is (numerically) zero.
_EPS = 1e-10


def filter_normalize(direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     ignore: str = "biasbn") -> TensorList:
    """Rescale each output slice of `direction` to the norm of the same slice of `params`.

    :param direction: tensor list like params (modified in place and returned).
    :param ignore: "biasbn" zeroes tensors with <= 1 dim; "none" copies the parameter values.
    """
    if ignore not in IGNORE_CHOICES:
        raise ValueError(f"ignore must be one of {IGNORE_CHOICES}, got {ignore!r}")
    with torch.no_grad():
        for d, p in zip(direction, params, strict=True):
            if p.dim() <= 1:
                if ignore == "biasbn":
                    d.zero_()
                else:
                    d.copy_(p)
                continue
            # (out, rest): one norm per output slice.
            d_rows = d.view(d.shape[0], -1)
            p_rows = p.detach().reshape(p.shape[0], -1)
            scale = p_rows.norm(dim=1) / (d_rows.norm(dim=1) + _EPS)
            d_rows.mul_(scale[:, None])
    return list(direction)


def surface_directions(params: Sequence[torch.Tensor], seed: int,
                       ignore: str = "biasbn") -> tuple[TensorList, TensorList]:
    """The two filter-normalised directions (delta, eta) for `params`."""
    pair = []
    for axis in (0, 1):
        raw = randn_like_params(params, seeding.generator(seed, SURFACE_KIND, axis, stream="directions"))
        pair.append(filter_normalize(raw, params, ignore))
    return pair[0], pair[1]


def grid_coordinates(grid: int, span: float) -> np.ndarray:
    """`grid` evenly spaced coordinates on [-span, span] (odd grids contain 0)."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return np.linspace(-span, span, grid) if grid > 1 else np.zeros(1)


@dataclasses.dataclass
class SurfaceResult:
    """Loss on a grid.

    :param x: (G,) coordinates a along delta.
    :param y: (G',) coordinates b along eta.
    :param losses: (G, G') with losses[i, j] = L(theta + x[i] delta + y[j] eta).
    :param loss: L(theta).
    :param direction_norms: (||delta||, ||eta||).
    :param direction_cosine: <delta, eta> / (||delta|| ||eta||).
    """

    x: np.ndarray
    y: np.ndarray
    losses: np.ndarray
    loss: float
    direction_norms: tuple[float, float]
    direction_cosine: float


def loss_surface(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor | float],
    x: Sequence[float],
    y: Sequence[float],
    seed: int,
    ignore: str = "biasbn",
    on_evaluation: Callable[[], None] | None = None,
) -> SurfaceResult:
    """Evaluate L on the grid x times y; parameters restored bit-exactly.

    Cost: 1 + len(x) * len(y) calls of `loss_fn` (the origin, if on the grid, reuses L(theta)).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    tick = on_evaluation or (lambda: None)
    with torch.no_grad(), restored(params) as origin:
        delta, eta = surface_directions(params, seed, ignore)
        norms = (norm(delta), norm(eta))
        cosine = dot(delta, eta) / (norms[0] * norms[1]) if norms[0] > 0 and norms[1] > 0 else 0.0
        base = float(loss_fn())
        tick()
        losses = np.empty((len(x), len(y)), dtype=np.float64)
        for i, a in enumerate(x):
            for j, b in enumerate(y):
                if a == 0.0 and b == 0.0:
                    losses[i, j] = base
                    continue
                set_offset(params, origin, [(float(a), delta), (float(b), eta)])
                losses[i, j] = float(loss_fn())
                tick()
    return SurfaceResult(x=x, y=y, losses=losses, loss=base, direction_norms=norms,
                         direction_cosine=cosine)
