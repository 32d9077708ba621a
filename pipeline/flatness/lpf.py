"""Low-pass-filter (LPF) flatness: the loss averaged over Gaussian weight noise.

LPF(theta) = E_delta L(theta + delta), estimated with M draws (Bisla et al. 2022). Lower is flatter.

Two scalings of the noise, evaluated on the same draws:

* "absolute": delta = sigma * z, i.i.d. N(0, sigma^2) on every parameter. For a quadratic L the
  expectation is exactly L(theta) + sigma^2/2 tr(H), which the tests use. It is not invariant to
  reparametrisation: where a normalisation layer follows, rescaling a filter by c leaves the
  function unchanged but changes the absolute LPF, which then measures weight scale.
* "filter": delta = sigma * r(theta) * z, with a per-element multiplier r fixed at the unperturbed
  theta (see `filter_noise_scales`): the noise of each output filter is proportional to that
  filter's norm, as in Bisla et al.'s LPF-SGD noise. Rescaling a filter by c rescales its noise by
  c, so the perturbed function, and hence this LPF, is unchanged wherever the function is.

Draw m is z_m ~ N(0, I) from the "directions" stream at counters (LPF_KIND, m), so every model,
every sigma of a sweep, both scalings and every M share the same z_m (common random numbers): a
sweep differs only in scale, and M = 5 is a prefix of M = 100.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import seeding
from pipeline.flatness.weights import TensorList, randn_like_params, restored, set_offset

# First counter of the "directions" stream for LPF draws (other measures use other kinds).
LPF_KIND = 0
SCALINGS = ("absolute", "filter")


@dataclasses.dataclass
class LPFResult:
    """LPF at one sigma and one noise scaling.

    :param sigma: noise standard deviation per parameter ("absolute") or per unit filter norm
        ("filter").
    :param loss: L(theta), the unperturbed loss.
    :param draw_losses: (M,) L(theta + delta_m).
    :param scaling: "absolute" or "filter" (see the module docstring).
    """

    sigma: float
    loss: float
    draw_losses: np.ndarray
    scaling: str = "absolute"

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


def filter_noise_scales(params: Sequence[torch.Tensor]) -> TensorList:
    """Per-element noise multipliers r of the "filter" scaling, shaped like `params`.

    * >= 2 dims, shape (C_out, ...): every element of filter k = W[k] gets r = ||W[k]||_2, the
      norm of its whole slice along dim 0 (the output channel), so the noise of filter k has
      std sigma * ||W[k]||_2 per element.
    * <= 1 dim (biases, GroupNorm weight and bias), shape (n,): every element gets
      r = ||b||_2 / sqrt(n), the root mean square of the tensor.

    Why the root mean square for 1-D tensors: their slices along dim 0 are single elements, one per
    output channel, so the rule above applied literally gives r_i = |b_i|. That leaves an entry
    that is exactly 0 (ADM initialises biases and GroupNorm shifts at 0) unperturbed, calling any
    direction through it perfectly flat. Pooling the per-channel multipliers by their quadratic
    mean keeps the literal rule's total noise energy on the tensor (n * sigma^2 ||b||^2 / n =
    sum_i sigma^2 b_i^2) and its scale behaviour under rescaling the whole tensor (r scales by c),
    while perturbing every entry. Taking the whole-tensor norm ||b||_2 instead (one filter of n
    elements) would perturb each entry sqrt(n) times more than its channel's own scale. The price:
    rescaling a single entry of a 1-D tensor changes the noise of the others.

    A filter or 1-D tensor that is all zero gets r = 0: it has no scale to be relative to, and
    stays unperturbed. The multipliers are computed in float64 and cast to each parameter's dtype.
    """
    scales = []
    with torch.no_grad():
        for p in params:
            values = p.detach().to(torch.float64)
            if p.dim() >= 2:
                per_filter = values.reshape(p.shape[0], -1).norm(dim=1)
                scale = per_filter.reshape(-1, *([1] * (p.dim() - 1))).expand(p.shape)
            else:
                rms = values.norm() / math.sqrt(max(p.numel(), 1))
                scale = rms.expand(p.shape)
            scales.append(scale.to(p.dtype).contiguous())
    return scales


def _scaled(z: Sequence[torch.Tensor], multipliers: Sequence[torch.Tensor] | None) -> Sequence[torch.Tensor]:
    # None = "absolute": the draw itself, no copy.
    if multipliers is None:
        return z
    return [d * r for d, r in zip(z, multipliers, strict=True)]


def low_pass_loss(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor | float],
    sigmas: Sequence[float],
    draws: int,
    seed: int,
    on_evaluation: Callable[[], None] | None = None,
    scalings: Sequence[str] = ("absolute",),
) -> list[LPFResult]:
    """LPF at each (scaling, sigma) with `draws` Monte-Carlo draws; parameters restored bit-exactly.

    Cost: 1 + len(scalings) * len(sigmas) * draws calls of `loss_fn`, plus one parameter-sized
    draw per m (and one scaled copy of it for "filter").

    :param params: the parameters to perturb (all trainable ones for the LPF measure).
    :param loss_fn: evaluates the loss at the current parameters; called under no_grad.
    :param sigmas: noise scales, each evaluated on the same draws.
    :param draws: M >= 1.
    :param seed: base seed of the draws.
    :param on_evaluation: called after every loss evaluation (progress bars).
    :param scalings: distinct entries of SCALINGS; all use the same draws z_m.
    :return: one LPFResult per (scaling, sigma), scalings in the given order, sigmas within each.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    unknown = [s for s in scalings if s not in SCALINGS]
    if unknown or not scalings or len(set(scalings)) != len(scalings):
        raise ValueError(f"scalings must be distinct entries of {SCALINGS}, got {list(scalings)}")
    tick = on_evaluation or (lambda: None)
    with torch.no_grad(), restored(params) as origin:
        # Fixed at theta: the multipliers must not follow the perturbation.
        multipliers = {s: filter_noise_scales(origin) if s == "filter" else None for s in scalings}
        base = float(loss_fn())
        tick()
        losses = np.zeros((len(scalings), len(sigmas), draws), dtype=np.float64)
        for m in range(draws):
            z = randn_like_params(params, seeding.generator(seed, LPF_KIND, m, stream="directions"))
            for k, scaling in enumerate(scalings):
                direction = _scaled(z, multipliers[scaling])
                for s, sigma in enumerate(sigmas):
                    set_offset(params, origin, [(float(sigma), direction)])
                    losses[k, s, m] = float(loss_fn())
                    tick()
                del direction
            del z
    return [LPFResult(sigma=float(sigma), loss=base, draw_losses=losses[k, s], scaling=scaling)
            for k, scaling in enumerate(scalings) for s, sigma in enumerate(sigmas)]
