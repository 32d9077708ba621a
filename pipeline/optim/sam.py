"""Sharpness-Aware Minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

SAM minimises max_{||e|| <= rho} L(theta + e). Its first-order inner solution is

    e = rho * g / ||g||                       (SAM)
    e = rho * T^2 g / ||T g||,  T = |theta| + eta   (ASAM, elementwise T)

with g = dL/dtheta on the current minibatch. The base optimiser then steps from theta with the
gradient taken at theta + e. One SAM step therefore costs two forward/backward passes; by hand:

    loss_at(theta).backward()        # pass 1
    sam.first_step()                 # theta <- theta + e
    sam.zero_grad()
    loss_at(theta).backward()        # pass 2, same minibatch
    sam.second_step()                # theta restored exactly, then the base step
    sam.zero_grad()

or as `sam.step(closure)`, the contract every recipe's optimizer shares (pipeline.training.step):
the closure runs forward + backward at the current weights and SAM calls it for both passes.

In a diffusion training step both passes must see the same x_0, timesteps t and noise (and IP
noise xi): the caller draws them once and reuses them. Dropout masks need not match.

Gradient clipping is not built in (ADM does not clip). If a caller clips, it should clip the
pass-2 gradient only; clipping pass 1 cannot change e, which depends on the direction of g.
Learning-rate schedulers belong on `sam.base_optimizer`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

_NORM_EPS = 1e-12  # keeps e finite when the gradient vanishes


class SAM(torch.optim.Optimizer):
    """A wrapper that turns any torch optimiser into SAM / ASAM.

    The base optimiser is built from `base_optimizer_cls(self.param_groups, **base_kwargs)`, and
    SAM then shares its param-group dicts, so `rho`, `adaptive`, `asam_eta`, `lr`, ... of a group
    live in one dict and may differ per group. The perturbation norm is global: one ||g|| (or
    ||T g||) over every parameter of every group that has a gradient.

    Example: SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-4, weight_decay=0.0).
    The base optimiser's state (e.g. Adam's moments) only ever sees the pass-2 gradients.

    With rho = 0 the perturbation is exactly zero and the restore is a copy, so the trajectory
    equals the base optimiser's bit for bit (provided the two passes give the same gradient).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.1,
        adaptive: bool = False,
        asam_eta: float = 0.0,
        m_sharpness: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        if asam_eta < 0.0:
            raise ValueError(f"ASAM eta must be >= 0, got {asam_eta}")
        defaults = dict(rho=rho, adaptive=adaptive, asam_eta=asam_eta, **base_kwargs)
        super().__init__(params, defaults)

        # Share the group dicts with the base optimiser: one source of truth for lr and rho.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # With data-parallel processes, each ascends along its own gradient (pass 1 not reduced).
        self.m_sharpness = m_sharpness

        # Exact copies of the parameters perturbed by the last first_step(); reused every step.
        self._saved: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: list[torch.Tensor] = []
        self._last_e_norm: torch.Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:
            # Called by Optimizer.__init__ before the base optimiser exists.
            super().add_param_group(param_group)
            return
        for key in ("rho", "adaptive", "asam_eta"):
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)

    @property
    def is_perturbed(self) -> bool:
        """True between first_step() and second_step()/restore()."""
        return bool(self._perturbed)

    @property
    def perturbation_norm(self) -> float | None:
        """||e|| of the last first_step() (rho for plain SAM), or None before the first one.

        Reading it synchronises with the device; read it only when logging.
        """
        return None if self._last_e_norm is None else float(self._last_e_norm)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """theta <- theta + e, saving exact copies of theta for second_step()/restore().

        Uses the gradients currently in `.grad` (pass 1). Parameters without a gradient are
        neither perturbed nor counted in the norm.
        """
        if self._perturbed:
            raise RuntimeError("SAM.first_step() called twice without second_step() or restore()")

        # Per group: the tensors whose global norm sets the scale (g, or T*g for ASAM).
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["adaptive"]:
                scale_t = torch._foreach_abs(params)
                if group["asam_eta"] != 0.0:
                    torch._foreach_add_(scale_t, group["asam_eta"])
                directions = torch._foreach_mul(scale_t, grads)
            else:
                scale_t = None
                directions = grads
            groups.append((group, params, scale_t, directions))
        if not groups:
            raise RuntimeError("SAM.first_step() found no gradients: run the first backward pass first")

        device = groups[0][1][0].device
        norms = [n.to(device) for _, _, _, directions in groups for n in _tensor_norms(directions)]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))

        e_norms_sq = []
        for group, params, scale_t, directions in groups:
            scale = (group["rho"] / (grad_norm + _NORM_EPS)).to(params[0].device)
            if scale_t is None:
                e = torch._foreach_mul(directions, scale)
            else:
                # directions = T*g already; one more T gives T^2 g without another buffer.
                torch._foreach_mul_(directions, scale_t)
                torch._foreach_mul_(directions, scale)
                e = directions
            e_norms_sq += [n.to(device).square() for n in _tensor_norms(e)]

            saved = [self._saved_buffer(p) for p in params]
            torch._foreach_copy_(saved, params)
            torch._foreach_add_(params, e)
            self._perturbed += params
        self._last_e_norm = torch.stack(e_norms_sq).sum().sqrt()

        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the parameters saved by first_step(), bit for bit; no optimiser step.

        A no-op when nothing is perturbed, so error paths may call it unconditionally.
        """
        if not self._perturbed:
            return
        torch._foreach_copy_(self._perturbed, [self._saved[p] for p in self._perturbed])
        self._perturbed = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore theta exactly, then take the base step with the pass-2 gradients."""
        if not self._perturbed:
            raise RuntimeError("SAM.second_step() called without a preceding first_step()")
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """The whole SAM step; `closure` runs forward + backward at the current weights.

        Gradients must be zero (or None) on entry. The closure is called twice, as
        pipeline.training.step describes: pass 1 at theta (`all_reduce=False` under m-sharpness,
        so each process ascends along its own gradient; the pass the log reports), then pass 2 at
        theta + e (`report=0`). Returns pass 1's loss.
        """
        if closure is None:
            raise RuntimeError("SAM.step() needs a closure; or call first_step() and second_step()")
        with torch.enable_grad():
            loss = closure(all_reduce=not self.m_sharpness)
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure(report=0)
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state_dict (its groups carry rho, adaptive and asam_eta)."""
        if self._perturbed:
            raise RuntimeError("SAM.state_dict() called while the parameters are perturbed")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load base state and groups (the checkpoint's rho/lr win, as in torch optimisers)."""
        self.base_optimizer.load_state_dict(state_dict)
        # torch rebuilds the group dicts on load; share them again.
        self.param_groups = self.base_optimizer.param_groups

    def _saved_buffer(self, param: torch.Tensor) -> torch.Tensor:
        buffer = self._saved.get(param)
        if buffer is None or buffer.shape != param.shape or buffer.device != param.device \
                or buffer.dtype != param.dtype:
            buffer = torch.empty_like(param)
            self._saved[param] = buffer
        return buffer


def _tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms as 0-dim tensors of one dtype, at least float32.

    Half-precision norms are accumulated in float32: in float16 they could overflow.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    low = [t for t in tensors if t.dtype != dtype]
    same = [t for t in tensors if t.dtype == dtype]
    norms = list(torch._foreach_norm(same, 2)) if same else []
    if low:
        norms += torch._foreach_norm(low, 2, dtype=dtype)
    return norms
