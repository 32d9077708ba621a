"""Hessian of the loss at the current parameters: top eigenvalue and trace, via H v products.

H v = d/dtheta (dL/dtheta . v) by double back-propagation on a fixed batch. The top eigenvalue
comes from power iteration, the trace from Hutchinson's estimator with Rademacher probes; both
follow PyHessian's stopping rules (Yao et al. 2020): stop when the relative change of the
estimate falls below `tol`, after at most `max_iter` products.

Power iteration converges to the eigenvalue of largest *magnitude*; at a trained minimum that is
the largest positive one, but a strongly negative direction would be reported with its sign.
Random vectors come from the "probes" stream, so a seed fixes every estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import seeding
from pipeline.flatness.weights import TensorList, dot, norm, randn_like_params

POWER_KIND = 0
HUTCHINSON_KIND = 1
# PyHessian's guard in the relative-change test.
_REL_EPS = 1e-6

LossChunk = tuple[Callable[[], torch.Tensor], float]


class HessianOperator:
    """v -> H v for L = sum_c weight_c * loss_c, the Hessian taken over `params`.

    With one chunk the gradient graph is built once and reused for every product (fast, but the
    graph stays in memory); with several chunks each product rebuilds the graph chunk by chunk,
    trading time for memory (a batch too large for one double backward).

    :param params: the parameters (the Hessian is over all of them jointly).
    :param loss_fn: a closure returning a scalar loss, or a list of (closure, weight) chunks.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 loss_fn: Callable[[], torch.Tensor] | Sequence[LossChunk]) -> None:
        self.params = list(params)
        self.chunks: list[LossChunk] = [(loss_fn, 1.0)] if callable(loss_fn) else list(loss_fn)
        if not self.chunks:
            raise ValueError("HessianOperator needs at least one loss chunk")
        self.products = 0
        self._cached: TensorList | None = None
        if len(self.chunks) == 1:
            self._cached = self._gradient(*self.chunks[0])

    def _gradient(self, loss_fn: Callable[[], torch.Tensor], weight: float) -> TensorList:
        with torch.enable_grad():
            loss = loss_fn() * weight
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def _product(self, grads: TensorList, vector: Sequence[torch.Tensor], retain: bool) -> TensorList:
        # Gradients that do not depend on theta (a loss linear in some tensor) contribute 0.
        linked = [i for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(p) for p in self.params]
        if linked:
            second = torch.autograd.grad([grads[i] for i in linked], self.params,
                                         grad_outputs=[vector[i] for i in linked],
                                         retain_graph=retain, allow_unused=True)
            out = [o if s is None else s.detach() for o, s in zip(out, second)]
        return out

    def __call__(self, vector: Sequence[torch.Tensor]) -> TensorList:
        """H v as a tensor list shaped like the parameters."""
        self.products += 1
        if self._cached is not None:
            return self._product(self._cached, vector, retain=True)
        total = [torch.zeros_like(p) for p in self.params]
        for loss_fn, weight in self.chunks:
            part = self._product(self._gradient(loss_fn, weight), vector, retain=False)
            for acc, piece in zip(total, part):
                acc.add_(piece)
        return total


@dataclasses.dataclass
class EigenResult:
    """Power iteration outcome: the estimate, how many products it took, and its history."""

    eigenvalue: float
    iterations: int
    converged: bool
    history: np.ndarray


@dataclasses.dataclass
class TraceResult:
    """Hutchinson outcome: the mean of v^T H v over the probes and its standard error."""

    trace: float
    stderr: float
    samples: np.ndarray
    converged: bool


def _relative_change(new: float, old: float) -> float:
    return abs(new - old) / (abs(old) + _REL_EPS)


def top_eigenvalue(hvp: Callable[[Sequence[torch.Tensor]], TensorList], params: Sequence[torch.Tensor],
                   seed: int, max_iter: int = 100, tol: float = 1e-3) -> EigenResult:
    """Largest-magnitude Hessian eigenvalue by power iteration.

    v_0 ~ N(0, I) normalised; each iteration computes H v, the Rayleigh quotient v^T H v, and
    v <- H v / ||H v||; it stops when the quotient changes by less than `tol` relative to the
    previous one. Cost: at most `max_iter` Hessian-vector products.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    v = randn_like_params(params, seeding.generator(seed, POWER_KIND, 0, stream="probes"))
    length = norm(v)
    v = [t / length for t in v]
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        hv = hvp(v)
        eigenvalue = dot(v, hv)
        history.append(eigenvalue)
        if len(history) > 1 and _relative_change(eigenvalue, history[-2]) < tol:
            converged = True
            break
        length = norm(hv)
        if length == 0.0:
            # H v = 0: v lies in the null space, and a zero Hessian has no better answer.
            converged = True
            break
        v = [t / length for t in hv]
    return EigenResult(eigenvalue=history[-1], iterations=len(history), converged=converged,
                       history=np.asarray(history))


def rademacher_like_params(params: Sequence[torch.Tensor], generator: torch.Generator) -> TensorList:
    """Independent +-1 entries shaped like `params` (drawn on the CPU generator, then moved)."""
    return [(torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(p.dtype) * 2 - 1).to(p.device)
            for p in params]


def hutchinson_trace(hvp: Callable[[Sequence[torch.Tensor]], TensorList], params: Sequence[torch.Tensor],
                     seed: int, max_iter: int = 100, tol: float = 1e-3) -> TraceResult:
    """tr(H) = E[v^T H v] over Rademacher v, averaged over up to `max_iter` probes.

    Stops once adding a probe changes the running mean by less than `tol` relative to the
    previous mean (so at least two probes). Cost: at most `max_iter` Hessian-vector products.
    The standard error is the probes' sample standard deviation over sqrt(count).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    samples: list[float] = []
    mean = 0.0
    converged = False
    for j in range(max_iter):
        v = rademacher_like_params(params, seeding.generator(seed, HUTCHINSON_KIND, j, stream="probes"))
        samples.append(dot(v, hvp(v)))
        new_mean = float(np.mean(samples))
        if len(samples) > 1 and _relative_change(new_mean, mean) < tol:
            mean, converged = new_mean, True
            break
        mean = new_mean
    count = len(samples)
    stderr = float(np.std(samples, ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
    return TraceResult(trace=mean, stderr=stderr, samples=np.asarray(samples), converged=converged)


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """Route the model's attention through a double-backward-capable path for the block.

    Models with `set_attention_backend` (the ADM UNet) switch to "math" (fused attention kernels
    have no double backward) and get their previous per-block choice back afterwards; other
    models pass through unchanged.
    """
    if not hasattr(model, "set_attention_backend"):
        yield model
        return
    previous = {m: m.attention_backend for m in model.modules() if "attention_backend" in vars(m)}
    model.set_attention_backend("math")
    try:
        yield model
    finally:
        for module, backend in previous.items():
            module.attention_backend = backend
