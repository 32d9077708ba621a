"""Ancestral (DDPM) sampling over a possibly respaced chain, with per-image random streams.

Each image owns a CPU torch.Generator seeded with its seed. It draws x_T first and then one
noise per step, after the model call and at every step including the last, which is
guided-diffusion's order. Image i therefore follows the same trajectory whatever the batch size
or device, and equals a guided-diffusion run of batch 1 after torch.manual_seed(seeds[i]) on CPU.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pipeline.diffusion.gaussian import GaussianDiffusion

StepCallback = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]


def _model_device(model: torch.nn.Module | Callable) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _draw(generators: Sequence[torch.Generator], image_shape: Sequence[int]) -> torch.Tensor:
    # One standard-normal image per generator, stacked to (N, C, H, W), on CPU in float32.
    return torch.stack([torch.randn(tuple(image_shape), generator=g) for g in generators])


def sample_images(
    model: torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    seeds: Sequence[int] | None,
    clip_denoised: bool = True,
    progress: bool = False,
    noise_for_step: Callable[[int], torch.Tensor] | None = None,
    on_step: StepCallback | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse chain k = K-1, ..., 0 and return the final images.

    At step k: output = model(x, diffusion.model_timesteps(k)), then p_mean_variance with
    `clip_denoised`, then x = mean + (k != 0) * exp(log_variance / 2) * noise. At k = 0 the result
    is the (clipped) predicted x_0.

    :param model: called as model(x (N, C, H, W), t (N,) int64 original timesteps). A Module is
        switched to eval mode for the run and restored afterwards; gradients are off.
    :param diffusion: the (respaced) chain to sample.
    :param shape: (N, C, H, W).
    :param seeds: N ints, one random stream per image. May be None only when both `x_T` and
        `noise_for_step` are given.
    :param noise_for_step: optional k -> (N, C, H, W) noise for step k, replacing the per-image
        draws after x_T (used to replay a recorded run).
    :param on_step: optional callback on_step(k, model_output, out) after each step, where
        `out` holds p_mean_variance's "mean", "variance", "log_variance", "pred_xstart" and the
        new state "sample"; model_output[:, :C] is the predicted eps at the current x.
    :param x_T: optional (N, C, H, W) starting noise replacing the per-image draw.
    :return: (N, C, H, W) float32 samples in [-1, 1] (when clip_denoised) on the model's device.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be (N, C, H, W), got {shape}")
    batch = shape[0]
    if seeds is None:
        if x_T is None or noise_for_step is None:
            raise ValueError("seeds may be None only when x_T and noise_for_step are both given")
        generators: list[torch.Generator] = []
    else:
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    device = _model_device(model)
    # Draw x_T even when it is supplied, so the per-step streams sit at the same position.
    drawn_start = _draw(generators, shape[1:]) if generators else None
    x = (x_T if x_T is not None else drawn_start).to(device=device, dtype=torch.float32)
    if tuple(x.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {shape}")

    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)

    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            for k in steps:
                t = torch.full((batch,), k, dtype=torch.int64, device=device)
                model_output = model(x, diffusion.model_timesteps(t))
                out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)

                # Always consume a draw, even at k = 0 where it is multiplied by zero.
                drawn = _draw(generators, shape[1:]) if generators else None
                noise = noise_for_step(k) if noise_for_step is not None else drawn
                noise = noise.to(device=device, dtype=x.dtype)

                keep_noise = 0.0 if k == 0 else 1.0
                x = out["mean"] + keep_noise * torch.exp(0.5 * out["log_variance"]) * noise
                if on_step is not None:
                    on_step(k, model_output, {**out, "sample": x})
    finally:
        if was_training:
            model.train()
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] floats to uint8 as guided-diffusion's sample script does: (x + 1) * 127.5,
    clamped to [0, 255], then truncated (not rounded). Same shape and layout as x."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
