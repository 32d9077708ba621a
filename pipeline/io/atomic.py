"""Files appear only when complete: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds.

    The temporary name starts with a dot and carries the PID, so a crashed writer never leaves a
    file under the final name and two writers never share a temporary file. On any exception the
    temporary file is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: object, final: str | os.PathLike) -> None:
    """torch.save through `atomic_path`, fsynced so a power cut cannot leave a torn file."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
