"""Training checkpoints and weights files: sealed torch files, read back with weights_only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io.integrity import DamagedFile, load_torch, save_torch

logger = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    save_torch(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none.

    A checkpoint is a cache: one that fails its checksum or cannot be read is deleted with a
    warning, and the run restarts from step 0 (the same trajectory, so the same result).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = load_torch(path, "it is deleted and the run restarts from step 0")
        if not isinstance(state, dict) or "step" not in state:
            raise DamagedFile(f"{path} is not a training checkpoint")
        return state
    except DamagedFile as err:
        logger.warning("warning: discarding checkpoint: %s", err)
        path.unlink(missing_ok=True)
        return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict saved by the train or quantize stage, checked against its hash, every
    floating tensor finite."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist; run the train stage first.")
    state = load_torch(path, "delete it and rerun the rule that makes it (train or quantize)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"weights file {path} is not a plain state_dict of tensors; delete it and "
                            f"rerun the rule that makes it (train or quantize).")
    refuse_non_finite(state, path)
    return state


def refuse_non_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """One pass over a state_dict: :raises PipelineError: naming the file and the first tensor
    holding NaN or inf (sealed properly, such weights would sample black images and NaN losses)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise PipelineError(f"weights file {path}: tensor '{name}' holds {bad} NaN or infinite "
                                    f"value(s) of {tensor.numel()}; the run that wrote it diverged: "
                                    f"retrain it (lower the learning rate) or delete it.")
