"""The named UNet configurations as plain data (see presets.py for what they cost).

No torch import: the Snakefile checks each dataset's preset against its resolution at planning
time from this table, before any job runs.
"""

from __future__ import annotations

from typing import Any

# Attention is in pixels here; everything else is a UNetModel keyword.
PRESET_TABLE: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
        attention_pixels=(16, 8), num_head_channels=32, dropout=0.3,
    ),
    "adm64": dict(
        image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_pixels=(32, 16, 8), num_head_channels=64, dropout=0.1,
    ),
    # A few minutes for ~1000 steps at batch 32 on 2 CPU cores. Doubling the width at 16x16 too,
    # mult (1, 2, 2), costs 57 instead of 34 GFLOP per training step.
    "demo": dict(
        image_size=32, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
        attention_pixels=(8,), num_head_channels=32, dropout=0.1,
    ),
    # The CPU demo and study: Fashion-MNIST box-filtered to 16x16 (see the docstring above).
    "fmnist16": dict(
        image_size=16, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_pixels=(4,), num_head_channels=16, dropout=0.1, norm_groups=8,
    ),
    # Unit tests only: the smallest network that still has every block type.
    "tiny": dict(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_pixels=(8,), num_head_channels=32, dropout=0.0,
    ),
}
