"""Build the network and diffusion a weights file belongs to, ready for measurement.

Every measure stage resolves the same few settings (UNet preset, image channels, diffusion) and
loads weights the same way; this is the one place that does it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.diffusion.gaussian import GaussianDiffusion, create_diffusion
from pipeline.errors import PipelineError
from pipeline.io.checkpoint import load_weights
from pipeline.nn.presets import PRESETS, build_unet


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What defines the network and its diffusion.

    :param preset: UNet preset name (pipeline.nn.presets).
    :param in_channels: image channels C of the data.
    :param diffusion: {"steps", "noise_schedule", "learn_sigma"[, "rescale_learned_sigmas"]}.
    """

    preset: str
    in_channels: int
    diffusion: Mapping[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "in_channels": self.in_channels, "diffusion": dict(self.diffusion)}


def build_diffusion(settings: ModelSettings, timestep_respacing: str = "") -> GaussianDiffusion:
    """The training diffusion ("" ) or a respaced chain of it (e.g. "20")."""
    d = settings.diffusion
    return create_diffusion(steps=int(d["steps"]), noise_schedule=d["noise_schedule"],
                            learn_sigma=bool(d["learn_sigma"]),
                            rescale_learned_sigmas=bool(d.get("rescale_learned_sigmas", True)),
                            timestep_respacing=timestep_respacing)


def load_model(settings: ModelSettings, weights: str | Path, device: torch.device,
               image_size: int | None = None) -> nn.Module:
    """The UNet of `settings` with `weights` loaded strictly, float32, eval mode, on `device`.

    :param image_size: the data's image side, checked against the preset's.
    """
    if settings.preset not in PRESETS:
        raise PipelineError(f"unknown UNet preset '{settings.preset}'; choose one of {', '.join(PRESETS)}.")
    model = build_unet(settings.preset, in_channels=settings.in_channels,
                       learn_sigma=bool(settings.diffusion["learn_sigma"]))
    if image_size is not None and image_size != model.image_size:
        raise PipelineError(f"the data holds {image_size}px images but preset '{settings.preset}' is "
                            f"built for {model.image_size}px.")
    state = load_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise PipelineError(f"weights {weights} do not fit preset '{settings.preset}' with "
                            f"{settings.in_channels} channels and learn_sigma="
                            f"{settings.diffusion['learn_sigma']}: {' '.join(first[:3])}") from None
    model = model.to(device=device, dtype=torch.float32)
    model.eval()
    return model
