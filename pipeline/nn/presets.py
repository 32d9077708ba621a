"""Named UNet configurations and a builder.

Presets state attention in PIXELS (the side of the feature map, as guided-diffusion's command-line
flags do); `unet_kwargs` converts them to the downsample factors `UNetModel` takes
(image_size // resolution). All presets use guided-diffusion's improved-ADM flags: scale-shift
norm, residual up/down sampling and the new attention order.

Parameter counts (measured, in_channels 3 and learned sigma unless stated):

* "cifar10": 57,094,662, equal to guided-diffusion's CIFAR-10 model.
* "adm64":  295,136,454, equal to guided-diffusion's 64x64 model (LSUN tower, FFHQ-64).
* "demo":      983,746 with in_channels 1 (Fashion-MNIST padded to 32x32); 985,478 with 3.
  One forward + backward + Adam step at batch 32 (eps-MSE, 2 threads) took about 0.2 s on the
  project's shared 2-core Xeon (34 GFLOP).
* "fmnist16":  345,154 with in_channels 1 (Fashion-MNIST at 16x16): 16 base channels, so
  GroupNorm with 8 groups instead of ADM's 32. Measured here with 1 thread: a training step at
  batch 64 in 0.28 s, sampling at 735 images x steps per second (the "demo" preset at 16 px:
  0.46 s and 354), which is what lets the CPU study train 21 runs and sample 2,000 images each.
* "tiny":      828,358 at image 16 (test-sized).
"""

from __future__ import annotations

import inspect
from typing import Any

# The table lives in a torch-free module so planning can check presets against resolutions.
from .preset_table import PRESET_TABLE as _PRESET_TABLE
from .unet import UNetModel

_COMMON_FLAGS: dict[str, Any] = dict(
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
)

PRESETS: tuple[str, ...] = tuple(_PRESET_TABLE)

_UNET_PARAMETERS = frozenset(inspect.signature(UNetModel.__init__).parameters) - {"self"}


def unet_kwargs(
    preset: str,
    in_channels: int = 3,
    learn_sigma: bool = True,
    num_classes: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """
    The UNetModel keyword arguments of a named preset.

    :param preset: one of PRESETS.
    :param in_channels: image channels; out_channels is 2 * in_channels with learned sigma
                        (epsilon, then the variance interpolation v), in_channels without.
    :param learn_sigma: whether the model also predicts the variance interpolation v.
    :param num_classes: number of classes for a class-conditional model, else None.
    :param overrides: preset fields to replace before conversion (`image_size`,
                      `attention_pixels`, ...) or any other UNetModel keyword
                      (`attention_resolutions` in downsample factors, `attention_backend`, ...).
    :return: a dict that `UNetModel(**kwargs)` accepts.
    """
    if preset not in _PRESET_TABLE:
        raise KeyError(f"unknown UNet preset {preset!r}; choose one of {PRESETS}")
    unknown = set(overrides) - _UNET_PARAMETERS - {"attention_pixels"}
    if unknown:
        raise TypeError(f"unknown UNet override(s) {sorted(unknown)}")
    if "attention_pixels" in overrides and "attention_resolutions" in overrides:
        raise TypeError("give attention either in pixels (attention_pixels) or as factors, not both")

    fields = {**_PRESET_TABLE[preset], **_COMMON_FLAGS, **overrides}
    image_size = fields["image_size"]
    attention_pixels = fields.pop("attention_pixels")
    if "attention_resolutions" not in fields:
        for res in attention_pixels:
            if image_size % res:
                raise ValueError(f"attention resolution {res} px does not divide image_size {image_size}")
        fields["attention_resolutions"] = tuple(image_size // res for res in attention_pixels)

    fields["in_channels"] = in_channels
    fields["num_classes"] = num_classes
    fields.setdefault("out_channels", 2 * in_channels if learn_sigma else in_channels)
    return fields


def build_unet(
    preset: str,
    in_channels: int = 3,
    learn_sigma: bool = True,
    num_classes: int | None = None,
    **overrides: Any,
) -> UNetModel:
    """Build the UNetModel of a named preset (arguments as in `unet_kwargs`)."""
    return UNetModel(**unet_kwargs(preset, in_channels, learn_sigma, num_classes, **overrides))
