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
    """A plain state_dict saved by the train or quantize stage, checked against its hash."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist; run the train stage first.")
    state = load_torch(path, "delete it and rerun the rule that makes it (train or quantize)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"weights file {path} is not a plain state_dict of tensors; delete it and "
                            f"rerun the rule that makes it (train or quantize).")
    return state
