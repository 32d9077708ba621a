"""Where tensors live: chosen at run time, so the same code runs on CPU and CUDA.

On a machine with several GPUs, Snakemake runs up to `--resources gpu=N` GPU jobs at once but
does not say which GPU each should use. Each process therefore claims a GPU no other pipeline
process holds: an exclusive lock on a file named after the GPU's UUID, kept until the process
exits (the kernel drops it even after SIGKILL). UUIDs, not indices, name the locks, because
under SLURM every job numbers its own GPUs from 0.

Every process that takes a GPU also fixes its numerics (`use_exact_cuda_numerics`): deterministic
kernels, so a resumed training run is bit-identical to an uninterrupted one on CUDA as on the CPU,
and full fp32 in convolutions and matmuls (PyTorch's default runs cuDNN convolutions in TF32,
rounding their inputs to 10 mantissa bits), so that a loss difference between two weights is
not TF32's rounding.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.errors import PipelineError

_held_locks: dict[str, int] = {}  # lock name -> open file descriptor, for the process's lifetime


def lock_dir() -> Path:
    return Path(os.environ.get("PIPELINE_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "pipeline-gpu-locks"))


def claim_free(names: list[str]) -> int | None:
    """Index of the first name this process holds or can lock now; None when all are taken."""
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        if name in _held_locks:
            return index
    for index, name in enumerate(names):
        fd = os.open(directory / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_locks[name] = fd
        return index
    return None


def use_exact_cuda_numerics() -> None:
    """Deterministic CUDA kernels and fp32 without TF32, for this process (see the module docstring).

    Measured on an H200 (bench/gpu_check.py cuda_numerics, cifar10, Adam, batch 128): 417
    images/s, against 455 in nondeterministic fp32 and 877 with torch's default TF32 convolutions;
    sampling is about 8x slower than with TF32. Process-wide switches, set before the first CUDA
    kernel runs (cuBLAS reads its workspace setting when it creates its handle).
    """
    # A fixed cuBLAS workspace makes its reductions repeatable.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def claim_gpu() -> torch.device:
    """A visible GPU that no other pipeline process holds (GPU 0, shared, when all are held)."""
    use_exact_cuda_numerics()
    count = torch.cuda.device_count()
    uuids = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    index = claim_free(uuids)
    if index is None:
        print(f"pipeline: all {count} visible GPU(s) are held by other pipeline processes; sharing "
              f"cuda:0. Run at most as many GPU jobs as GPUs (snakemake --resources gpu={count}).",
              file=sys.stderr)
        index = 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> a free GPU when torch sees one, else cpu; 'cuda' without a GPU is an error.

    'cuda' and 'auto' claim a GPU (see the module docstring); 'cuda:K' takes GPU K as asked.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device '{name}' was asked for but torch sees no CUDA device; "
                            "set device: auto or cpu.")
    if name != "cpu" and not name.startswith("cuda"):
        raise PipelineError(f"unknown device '{name}'; use auto, cpu or cuda.")
    if name == "cuda":
        return claim_gpu()
    if name.startswith("cuda"):
        use_exact_cuda_numerics()
    return torch.device(name)
