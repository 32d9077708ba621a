"""torch.compile of the UNet's forward, where a job evaluates enough images to repay it.

Sampling, exposure and the loss-based measures (lpf, perturbation, surface) spend nearly all their
time in the UNet's forward pass. Inductor fuses its GroupNorm, SiLU and elementwise tails: the
fmnist16 sampling loop runs 1.23-1.42x faster on one CPU thread (bench/overhead.py, batch 250 and
16). Compiling cost 46 s in a machine's first process (an empty inductor cache) and 5 s in every
later one (the cache is on disk), so at one process per job it pays only when the job is large.

Policy (config `forward_compile`): `off`, `on`, or `auto` = compile when the job's forward work,
image-forwards x FLOPs per image-forward, reaches `min_gflop[device type]`. The work is the
whole job's, never what is left of it, so a resumed job takes the same path as an uninterrupted
one (results stay bit-identical across kill and resume).

What compiling changes: eps differs from the eager forward by about 1e-6 (reassociated sums), and
a sampled image by at most one uint8 level (tested). The Hessian stage stays eager: inductor's
autograd does not take the double backward its Hessian-vector products need.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.errors import PipelineError

MODES = ("auto", "on", "off")
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompilePolicy:
    """When to compile: mode auto | on | off; auto compiles at >= min_gflop[device type] of forward work."""

    mode: str = "off"
    min_gflop: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None) -> "CompilePolicy":
        """From the config's `forward_compile` block (None: off, as a stage run without a config)."""
        if not block:
            return cls()
        mode = block.get("mode", "off")
        if mode not in MODES:
            raise PipelineError(f"forward_compile.mode must be one of {', '.join(MODES)}, got {mode!r}.")
        return cls(mode=mode, min_gflop=dict(block.get("min_gflop") or {}))

    def decide(self, device: torch.device, work_flops: float) -> tuple[bool, str]:
        """Whether to compile a job of `work_flops` forward FLOPs on `device`, and why (for the log)."""
        if self.mode != "auto":
            return self.mode == "on", f"forward_compile.mode is {self.mode}"
        if device.type not in self.min_gflop:
            return False, f"auto, and forward_compile.min_gflop has no threshold for {device.type}"
        threshold = float(self.min_gflop[device.type])
        work = work_flops / 1e9
        verdict = ">=" if work >= threshold else "<"
        return work >= threshold, f"auto: {work:,.0f} GFLOP of forwards {verdict} min_gflop.{device.type} {threshold:,.0f}"


def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """FLOPs of one image's forward pass (C, H, W), counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(iter(model.parameters()))
    x = torch.zeros((1, *image_shape), device=parameter.device, dtype=parameter.dtype)
    t = torch.zeros((1,), device=parameter.device, dtype=torch.int64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def compile_forward(model: nn.Module, batch_size: int) -> None:
    """Route `model`'s forward through torch.compile for batches of exactly `batch_size` images.

    The module stays the same object (parameters, attributes, eval mode, in-place weight edits
    all seen by the compiled graph, whose parameters are inputs). A batch of another size (the
    last, partial one of a loop) runs eager: a second compile would cost more than it saves.
    """
    if "forward" in vars(model):
        return  # already routed
    eager = model.forward
    compiled = torch.compile(eager, dynamic=False)

    def forward(x: torch.Tensor, timesteps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] != batch_size:
            return eager(x, timesteps, *args, **kwargs)
        try:
            return compiled(x, timesteps, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            # Inductor on CPU builds C++ kernels: a machine without g++ fails here, on the first batch.
            raise PipelineError(f"torch.compile of the UNet forward failed ({str(err).splitlines()[0][:300]}); "
                                f"install a C++ compiler (Debian: apt-get install g++) or set "
                                f"forward_compile.mode: off in the config.") from err

    model.forward = forward


def apply_policy(model: nn.Module, policy: CompilePolicy, device: torch.device, image_forwards: int,
                 batch_size: int, image_shape: tuple[int, int, int], job: str) -> bool:
    """Compile `model`'s forward when `policy` says a job of `image_forwards` images pays; log why.

    :param image_forwards: images passed through the network by the whole job (resumed or not).
    :param batch_size: the loop's batch, the one shape compiled.
    :return: whether the forward is now compiled.
    """
    if policy.mode == "off":
        logger.info("%s: eager forward (forward_compile.mode is off)", job)
        return False
    work = image_forwards * flops_per_image(model, image_shape) if policy.mode == "auto" else 0.0
    chosen, reason = policy.decide(device, work)
    if policy.mode == "auto" and chosen and image_forwards < 2 * batch_size:
        chosen, reason = False, f"{reason}, but fewer than two full batches of {batch_size}"
    logger.info("%s: %s forward (%s)", job, "compiled" if chosen else "eager", reason)
    if chosen:
        compile_forward(model, batch_size)
    return chosen
