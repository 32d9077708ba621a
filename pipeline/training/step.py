"""One training step: the only code that turns a batch into an update, for every recipe.

The optimizer stays opaque. `optimizer.step(closure)` calls the closure as often as its
algorithm needs: once for AdamW or SGD, twice for SAM (at theta, then at theta + e), once per
draw for fSGLD. The closure runs forward and backward at the current weights and adds to `.grad`;
it zeroes nothing. Two keywords let a recipe's optimizer say what a pass is:

    closure(all_reduce=True, report=1)

- all_reduce=False keeps the pass's gradient on this process (DDP no_sync): SAM's m-sharpness
  ascent, and every fSGLD draw but the last, whose backward then reduces the summed gradient once.
- report=k > 0 marks the pass the training log records: its loss terms, and the norm of the mean
  of the k gradients `.grad` then holds summed; report=0 passes are not logged. A plain torch
  optimizer calls closure() and so reports its only pass.

The reported pass's loss terms are averaged over processes and checked for finite values right
after its backward pass, before the optimizer moves the weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from pipeline import distributed, seeding
from pipeline.diffusion.timestep_sampler import LossSecondMomentResampler
from pipeline.errors import PipelineError


def use_channels_last(model: torch.nn.Module, device: torch.device, cuda: Mapping[str, Any]) -> torch.nn.Module:
    """The model in the memory layout the step runs it in; call before building the optimizer."""
    if device.type == "cuda" and cuda.get("channels_last"):
        return model.to(memory_format=torch.channels_last)
    return model


class TrainingStep:
    """Turns one step's batch into one update of `model`, and of the EMA and SWA averages.

    Built after the weights are loaded (a resumed run), because data parallelism broadcasts
    process 0's weights when it wraps the model. `cuda` holds the training.cuda settings (bf16
    autocast, torch.compile); they apply on a CUDA device only. `ema` and `swa` are None on
    every process but the main one.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, diffusion, sampler,
                 recipe_name: str, *, seed: int, device: torch.device, procs: distributed.Processes,
                 cuda: Mapping[str, Any], ema=None, swa=None) -> None:
        self.model, self.optimizer, self.diffusion, self.sampler = model, optimizer, diffusion, sampler
        self.recipe_name, self.seed, self.procs = recipe_name, seed, procs
        self.ema, self.swa = ema, swa
        cuda = cuda if device.type == "cuda" else {}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(cuda.get("bf16")))

        # Data parallel: DDP all-reduces (averages) the gradients in every backward pass.
        self.ddp = None
        if procs.parallel:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = self.ddp if self.ddp is not None else model
        if cuda.get("compile"):
            self.forward = torch.compile(self.forward)

    def __call__(self, batch, step: int, stop_requested: bool = False) -> dict[str, Any]:
        """Update the weights from `batch` (pipeline.training.draws.draw_step's tuple) at `step`.

        Returns the logged numbers: loss, mse, vb (means over the global batch), grad_norm, lr,
        and `stop`: whether any process had `stop_requested` (one flag, agreed by all of them).
        """
        x0, t, weights, noise, input_noise = batch
        torch.manual_seed(seeding.derive_seed(self.seed, step, self.procs.rank, stream="dropout"))
        record: dict[str, Any] = {}

        def closure(all_reduce: bool = True, report: int = 1) -> torch.Tensor:
            with contextlib.nullcontext() if all_reduce else self._local_gradient_only():
                with self.autocast:
                    terms = self.diffusion.training_losses(self.forward, x0, t, noise, input_noise=input_noise)
                loss = (terms["loss"] * weights).mean()
                loss.backward()
            if report:
                record["grad_norm"] = _grad_norm(self.model.parameters()) * (1.0 / report)
                record.update(_global_stats(loss, terms, self.procs, stop_requested))
                record["per_sample_loss"] = terms["loss"].detach()
                _check_finite(record, step, self.recipe_name)
            return loss

        # Update: every pass the recipe needs, then the optimizer's own step.
        self.optimizer.step(closure)
        self.optimizer.zero_grad(set_to_none=True)
        per_sample_loss = record.pop("per_sample_loss")
        if isinstance(self.sampler, LossSecondMomentResampler):  # the only sampler that learns
            self.sampler.update(distributed.gather_in_rank_order(t, self.procs),
                                distributed.gather_in_rank_order(per_sample_loss, self.procs))

        # Averages see only the stepped weights (never SAM's or fSGLD's perturbed point).
        if self.ema is not None:
            self.ema.update(self.model)
        if self.swa is not None:
            self.swa.update(self.model, step + 1)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def _local_gradient_only(self):
        """Backward passes that keep this process's gradient (no all-reduce), under DDP."""
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()


def _grad_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def _global_stats(loss: torch.Tensor, terms: Mapping[str, torch.Tensor], procs: distributed.Processes,
                  stop_requested: bool) -> dict[str, Any]:
    """Batch means of the loss terms over all processes, whether any term was non-finite, and
    whether any process was asked to stop.

    One small all-reduce, so every process sees the same numbers and stops together.
    """
    vb = terms["vb"] if "vb" in terms else torch.zeros_like(terms["mse"])
    local = torch.stack([loss.detach(), terms["mse"].detach().mean(), vb.detach().mean(),
                         (~torch.isfinite(terms["mse"])).any().float(),
                         (~torch.isfinite(vb)).any().float(),
                         torch.tensor(float(stop_requested), device=loss.device)]).double()
    total = distributed.sum_over_processes(local, procs).tolist()
    n = procs.world_size
    return {"loss": total[0] / n, "mse": total[1] / n, "vb": total[2] / n,
            "nonfinite_mse": total[3] > 0, "nonfinite_vb": total[4] > 0, "stop": total[5] > 0}


def _check_finite(stats: Mapping[str, Any], step: int, recipe_name: str) -> None:
    bad = [name for name in ("mse", "vb") if stats[f"nonfinite_{name}"]]
    if bad:
        raise PipelineError(f"non-finite training loss at step {step + 1} of recipe '{recipe_name}' "
                            f"(term: {', '.join(bad)}); the last good checkpoint is kept. Lower the "
                            f"learning rate or the recipe's perturbation strength and rerun.")
