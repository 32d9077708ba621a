"""Weight averages of one training run: EMA (every step) and SWA (every `every` steps, late).

Both keep their average in a torch.optim.swa_utils.AveragedModel (a copy of the model plus an
`n_averaged` counter) and update it with torch's own foreach averaging functions. The update
bypasses AveragedModel.update_parameters, whose per-call Python work (re-listing, detaching and
regrouping every tensor) cost ~9x the foreach arithmetic itself for 500 small tensors on CPU;
here the tensor lists are built once per source model and reused, and the counter is a Python
int, so an update never waits on the device.

Both read the raw trained weights after the optimiser step (for SAM: the restored-and-stepped
weights, never theta + e; for fSGLD: the weights including the Langevin noise). Buffers are
copied from the live model, not averaged (AveragedModel's use_buffers=False); the ADM UNet has
none.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from pipeline.errors import PipelineError


class _Average:
    """Shared machinery: an AveragedModel, cached tensor lists, checkpoint round trip."""

    def __init__(self, model: nn.Module, multi_avg_fn: Callable[..., None]) -> None:
        # The deep copy made here is the only copy of the model: nothing is copied per step.
        self.averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        self.averaged.requires_grad_(False)
        self._multi_avg_fn = multi_avg_fn
        self._count = 0  # mirrors averaged.n_averaged without reading a device tensor
        self._source: nn.Module | None = None
        self._param_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._buffer_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @property
    def n_averaged(self) -> int:
        """How many weight vectors the average holds (EMA: 1 + number of updates)."""
        return self._count

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own key names (detached copies)."""
        return {k: v.detach().clone() for k, v in self.averaged.module.state_dict().items()}

    @torch.no_grad()
    def _accumulate(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (a plain copy when it is empty)."""
        if model is not self._source:
            self._cache_lists(model)
        for averaged, current in self._param_groups:
            if self._count == 0:
                torch._foreach_copy_(averaged, current)
            else:
                self._multi_avg_fn(averaged, current, self._count)
        if self._buffer_pairs[0]:
            torch._foreach_copy_(*self._buffer_pairs)
        self._set_count(self._count + 1)

    def _set_count(self, count: int) -> None:
        self._count = count
        self.averaged.n_averaged.fill_(count)

    def _cache_lists(self, model: nn.Module) -> None:
        # Pair tensors by position, as AveragedModel does, grouped by (device, dtype) for foreach.
        # The Parameter objects themselves are kept (not detached views), so the lists stay valid
        # if a module later swaps a parameter's .data.
        own, src = list(self.averaged.module.parameters()), list(model.parameters())
        own_buffers, src_buffers = list(self.averaged.module.buffers()), list(model.buffers())
        for kind, mine, theirs in (("parameters", own, src), ("buffers", own_buffers, src_buffers)):
            layout = [(t.shape, t.dtype, t.device) for t in mine]
            if layout != [(t.shape, t.dtype, t.device) for t in theirs]:
                raise ValueError(f"the model passed to update() does not match the averaged copy's {kind} "
                                 "(architecture, dtype or device); build the average after moving the "
                                 "model to its device and dtype")
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for a, p in zip(own, src):
            averaged, current = groups.setdefault((a.device, a.dtype), ([], []))
            averaged.append(a)
            current.append(p)
        self._param_groups = list(groups.values())
        self._buffer_pairs = (own_buffers, src_buffers)
        self._source = model

    def _checkpoint(self, **settings: Any) -> dict[str, Any]:
        return {"settings": settings, "averaged": self.averaged.state_dict()}

    def _restore_checkpoint(self, state: dict[str, Any], name: str, **settings: Any) -> None:
        changed = [f"{k}: checkpoint {state['settings'].get(k)!r}, now {v!r}"
                   for k, v in settings.items() if state["settings"].get(k) != v]
        if changed:
            raise PipelineError(f"{name} checkpoint was made with other settings (" + "; ".join(changed) + ")")
        self.averaged.load_state_dict(state["averaged"])
        self._count = int(self.averaged.n_averaged)


class EMA(_Average):
    """Exponential moving average of the weights, ADM style: ema <- decay * ema + (1 - decay) * theta.

    The average starts as a copy of the weights at construction (ADM), so after k updates
    ema = decay^k * theta_0 + (1 - decay) * sum_i decay^(k-i) * theta_i. torch's AveragedModel
    would instead copy on its first update; setting its counter to 1 here skips that copy.
    Construct it after the model is on its device; call update() after every optimiser step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(model, get_ema_multi_avg_fn(decay))
        self.decay = decay
        self._set_count(1)

    @property
    def num_updates(self) -> int:
        return self.n_averaged - 1

    def update(self, model: nn.Module) -> None:
        """Fold in the model's current weights (after an optimiser step)."""
        self._accumulate(model)

    def state_dict(self) -> dict[str, Any]:
        return self._checkpoint(decay=self.decay)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_checkpoint(state, "EMA", decay=self.decay)


class SWA(_Average):
    """Stochastic weight averaging: the equal average of snapshots taken every `every` steps.

    Snapshots are taken at steps start_step, start_step + every, ..., up to total_steps, with
    start_step = round(start_fraction * total_steps) (Python's round, ties to even) and `step`
    the number of completed optimiser steps. The paper's 200K-step setting (start_fraction 0.9,
    every 100) collects 201 snapshots, 180 000 through 200 000. The learning rate is left
    alone (constant-LR SWA, as ADM trains at a constant rate).
    """

    def __init__(self, model: nn.Module, start_fraction: float = 0.9, every: int = 100,
                 total_steps: int = 200_000) -> None:
        if not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"SWA start_fraction must be in [0, 1], got {start_fraction}")
        if every < 1 or total_steps < 1:
            raise ValueError(f"SWA needs every >= 1 and total_steps >= 1, got {every}, {total_steps}")
        start_step = round(start_fraction * total_steps)
        if start_step < 1:
            raise PipelineError(f"SWA start_fraction {start_fraction} of {total_steps} steps rounds to "
                                "step 0: the average would include the untrained initial weights")
        super().__init__(model, get_swa_multi_avg_fn())
        self.start_fraction = start_fraction
        self.every = every
        self.total_steps = total_steps
        self.start_step = start_step
        self.last_step = -1  # step of the last snapshot

    def collection_steps(self) -> range:
        """Every step at which a snapshot is taken."""
        return range(self.start_step, self.total_steps + 1, self.every)

    def is_collection_step(self, step: int) -> bool:
        return self.start_step <= step <= self.total_steps and (step - self.start_step) % self.every == 0

    def update(self, model: nn.Module, step: int) -> bool:
        """Take a snapshot if `step` (completed optimiser steps) is a collection step.

        Returns whether it did. Passing the same or an earlier collection step twice raises:
        it would count one snapshot twice (e.g. a resumed loop repeating its last step).
        """
        if not self.is_collection_step(step):
            return False
        if step <= self.last_step:
            raise RuntimeError(f"SWA snapshot at step {step} requested after the one at step {self.last_step}")
        self._accumulate(model)
        self.last_step = step
        return True

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The SWA weights; raises if no snapshot was collected (the run ended too early)."""
        if self.n_averaged == 0:
            raise PipelineError(
                f"SWA collected no snapshot: collection starts at step {self.start_step} "
                f"(start_fraction {self.start_fraction} of {self.total_steps} steps, every {self.every}), "
                "and the run never reached it; train to the end or lower swa start_fraction")
        return super().averaged_state_dict()

    def state_dict(self) -> dict[str, Any]:
        state = self._checkpoint(start_step=self.start_step, every=self.every, total_steps=self.total_steps)
        state["last_step"] = self.last_step
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_checkpoint(state, "SWA", start_step=self.start_step, every=self.every,
                                 total_steps=self.total_steps)
        self.last_step = int(state["last_step"])
