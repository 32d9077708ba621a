"""Files appear only when complete: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from pipeline.errors import DISK_ERRNOS


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds.

    The temporary name starts with a dot and carries the PID, so a crashed writer never leaves a
    file under the final name and two writers never share a temporary file. On any exception the
    temporary file is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, re.escape(final.name))
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        # h5py and torch report a full disk without the file's name; the user needs it.
        if err.errno in DISK_ERRNOS and not err.filename:
            raise OSError(err.errno, os.strerror(err.errno), str(final)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()



def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name_regex: str) -> list[Path]:
    """Delete `.{name}.tmp-PID` files in `folder` (name matching `name_regex`) whose writer no
    longer runs; returns them.

    A SIGKILL skips the cleanup of `atomic_path`; the next writer of the same file removes what
    the dead process left. A live PID's file is kept. Only the writer of the same final name
    sweeps (Snakemake runs one job per output), so a job on another node of a shared file
    system, whose PID means nothing here, never loses its temporary file to this sweep.
    """
    folder = Path(folder)
    pattern = re.compile(rf"\.(?:{name_regex})\.tmp-(\d+)")
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match[1]) != os.getpid() and not pid_alive(int(match[1])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
