"""Where tensors live: chosen at run time, so the same code runs on CPU and CUDA."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device '{name}' was asked for but torch sees no CUDA device; "
                            "set device: auto or cpu.")
    if name != "cpu" and not name.startswith("cuda"):
        raise PipelineError(f"unknown device '{name}'; use auto, cpu or cuda.")
    return torch.device(name)
