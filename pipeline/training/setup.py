"""What a training run is built from, given its resolved settings (pipeline.settings.train_settings).

The train stage and `plan --calibrate` both build through here, so calibration times the network,
diffusion, optimizer and averages that training runs.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline import seeding
from pipeline.diffusion.gaussian import create_diffusion
from pipeline.diffusion.timestep_sampler import create_timestep_sampler
from pipeline.nn.presets import build_unet
from pipeline.optim.averages import EMA, SWA
from pipeline.training.step import use_channels_last


def build_model(settings: Mapping[str, Any], channels: int, device: torch.device) -> torch.nn.Module:
    """The run's UNet with its seeded initial weights, on `device` in the step's memory layout."""
    torch.manual_seed(seeding.derive_seed(settings["seed"], stream="init"))
    model = build_unet(settings["preset"], in_channels=channels,
                       learn_sigma=settings["diffusion"]["learn_sigma"]).to(device)
    return use_channels_last(model, device, settings["cuda"])


def build_diffusion(settings: Mapping[str, Any]):
    """The training diffusion and its timestep sampler."""
    d = settings["diffusion"]
    diffusion = create_diffusion(steps=d["steps"], noise_schedule=d["noise_schedule"],
                                 learn_sigma=d["learn_sigma"])
    return diffusion, create_timestep_sampler(settings["schedule_sampler"], diffusion.num_timesteps)


def build_averages(model: torch.nn.Module, settings: Mapping[str, Any]) -> tuple[EMA, SWA]:
    """The EMA and SWA of the weights, as the run's settings define them."""
    return (EMA(model, decay=settings["ema"]["decay"]),
            SWA(model, start_fraction=settings["swa"]["start_fraction"], every=settings["swa"]["every"],
                total_steps=settings["steps"]))
