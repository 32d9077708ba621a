"""glibc malloc settings for the pipeline's processes: a forward's buffers reused, not faulted in anew.

PyTorch's CPU tensors come from malloc. With glibc's defaults a buffer above the mmap threshold
(dynamic, at most 32 MiB) is a fresh mapping, and a freed heap top above the trim threshold goes
back to the kernel, so the next forward's buffers of the same sizes are new pages, which the kernel
faults in and zeroes 4 KiB at a time: an fmnist16 forward at batch 500 took 19,000-22,000 page
faults. Three settings remove them (bench/allocator.py measures each rule's work units with and
without; the README quotes it):

- `glibc.malloc.mmap_threshold` fixed at 32 MiB, glibc's largest: every buffer up to that size
  comes from the heap, which a process keeps;
- `glibc.malloc.trim_threshold` 64 GiB: freed heap memory is kept for the next forward (the peak
  resident memory does not grow: the same sizes come back each step);
- `glibc.malloc.hugetlb=1`: transparent huge pages (madvise mode) for the heap and for the buffers
  still mapped, one fault per 2 MiB instead of per 4 KiB (glibc >= 2.35; older ones ignore it).

Setting the trim threshold alone would be worse than nothing: it also freezes the mmap threshold
at 128 KiB (every buffer a fresh mapping; 1.8x slower forwards), hence the three together.

Only where buffers live changes, not any value: outputs are bit-identical (tests/test_allocator.py).
glibc reads GLIBC_TUNABLES once, when a process starts, so `reexec_with_tuned_allocator`, called
by the entry points before they import torch, replaces a process that lacks them with the same
command line with them set (os.execve: same PID, descriptors and arguments). A value the user set
for one of these keys is kept. PIPELINE_ALLOCATOR=system keeps glibc's defaults.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

VARIABLE = "GLIBC_TUNABLES"
CHOICE_VARIABLE = "PIPELINE_ALLOCATOR"
CHOICES = ("tuned", "system")
TUNABLES = {
    "glibc.malloc.mmap_threshold": str(32 * 1024 ** 2),
    "glibc.malloc.trim_threshold": str(64 * 1024 ** 3),
    "glibc.malloc.hugetlb": "1",
}


def _is_glibc_linux() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # musl and other C libraries have no such name
        return False


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with the allocator's tunables added to GLIBC_TUNABLES, or None when nothing is to
    add (already there or set otherwise by the user, PIPELINE_ALLOCATOR=system, not glibc Linux)."""
    choice = environ.get(CHOICE_VARIABLE, "tuned")
    if choice not in CHOICES:
        raise SystemExit(f"error: {CHOICE_VARIABLE}={choice!r}: use one of {', '.join(CHOICES)} "
                         f"(tuned: the pipeline's malloc settings, pipeline/allocator.py; system: glibc's)")
    if choice == "system" or not _is_glibc_linux():
        return None
    current = [item for item in environ.get(VARIABLE, "").split(":") if item]
    present = {item.split("=", 1)[0] for item in current}
    missing = [f"{key}={value}" for key, value in TUNABLES.items() if key not in present]
    if not missing:
        return None
    return {**environ, VARIABLE: ":".join(current + missing)}


def reexec_with_tuned_allocator() -> None:
    """Replace this process by the same command with the tuned allocator, if it lacks it; returns
    only when nothing is to change. Call before anything heavy is imported: the work is redone."""
    environment = tuned_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
