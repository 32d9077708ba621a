"""Resumable training checkpoints: one file, written atomically, read back with weights_only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_torch_save


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none; a damaged file is a clear error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise PipelineError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}). "
                            f"Delete it to restart this run from step 0.") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict saved by the train or quantize stage (or by guided-diffusion)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist; run the train stage first.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PipelineError(f"weights file {path} cannot be read ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"weights file {path} is not a plain state_dict of tensors.")
    return state
