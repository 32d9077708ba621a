"""Parameter snapshots and vector algebra on lists of tensors.

A "vector" over a model is a list of tensors shaped like its parameters; the measures never
concatenate them, so a direction costs one copy of the parameters and nothing more.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

TensorList = list[torch.Tensor]


def trainable_parameters(model_or_params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters with requires_grad, in module order (a list passes through, filtered)."""
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return [p for p in params if p.requires_grad]


def num_elements(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two tensor lists, accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def norm(vector: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a tensor list, accumulated in float64."""
    return math.sqrt(sum(float(x.double().square().sum()) for x in vector))


def parameter_norm(params: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return norm(params)


def randn_like_params(params: Sequence[torch.Tensor], generator: torch.Generator) -> TensorList:
    """Standard-normal tensors shaped like `params`, drawn tensor by tensor in order.

    Drawn on the CPU generator and then moved, so CPU and CUDA runs see the same numbers.
    """
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            for p in params]


@contextlib.contextmanager
def restored(params: Sequence[torch.Tensor]) -> Iterator[TensorList]:
    """Save copies of `params`, yield them, and copy them back on exit (also on error).

    Restoring from a copy (never by subtracting the perturbation) makes the parameters
    bit-identical afterwards, whatever arithmetic happened in between.
    """
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)


def set_offset(params: Sequence[torch.Tensor], origin: Sequence[torch.Tensor],
               terms: Sequence[tuple[float, Sequence[torch.Tensor]]]) -> None:
    """Set params = origin + sum_i coefficient_i * direction_i, in place.

    :param terms: (coefficient, direction) pairs; each direction is a tensor list like params.
    Starting from a copy of `origin` each time keeps rounding errors from accumulating along a
    sweep, and a zero offset reproduces the origin exactly.
    """
    with torch.no_grad():
        for index, (p, p0) in enumerate(zip(params, origin, strict=True)):
            p.copy_(p0)
            for coefficient, direction in terms:
                if coefficient != 0.0:
                    p.add_(direction[index], alpha=coefficient)
