"""Output locks: one writer per output path, across working directories, checkouts and hosts.

Snakemake's own lock lives in its working directory, so two checkouts whose configs name the
same absolute results folder both run the job that writes a file there. Each stage therefore
claims its outputs before any compute: for an output file `F` it holds an exclusive `flock` on
`.F.lock` beside it, for an output folder `D` on `D/.lock`. The lock file records the holder
(host, PID, start time, command), so a second writer says whom it waits for.

The kernel drops a flock when its holder dies, kill -9 included: a lock file left by a dead
process is free again, and its record is reported as stale when it is taken over. A claim
waits (logging one line) until the holder finishes; with $PIPELINE_LOCK_TIMEOUT set it stops
with one line after that many seconds. Lock files are deleted on release; a waiter that locked
a file deleted meanwhile notices (its inode is gone) and locks the new one.

Claiming a folder also checks that it is writable: a read-only run folder is refused here,
before the compute, instead of at the first write after it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterable

from pipeline.errors import PipelineError
from pipeline.io.atomic import pid_alive

TIMEOUT_VARIABLE = "PIPELINE_LOCK_TIMEOUT"
POLL_SECONDS = 0.5

logger = logging.getLogger(__name__)

# Lock file (resolved) -> open descriptor, for every lock this process holds.
_HELD: dict[str, int] = {}
# Folders a claim created, removed again on release when still empty.
_CREATED: list[Path] = []


def lock_file(output: str | os.PathLike, folder: bool = False) -> Path:
    """The lock file of an output file (`.name.lock` beside it) or folder (`.lock` inside it)."""
    output = Path(output)
    return output / ".lock" if folder else output.with_name(f".{output.name}.lock")


def _make_folder(folder: Path) -> None:
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    _CREATED.extend(reversed(missing))


def check_writable(folder: Path) -> None:
    """:raises OSError: naming `folder`, when files cannot be created there (read-only, mode)."""
    if os.access(folder, os.W_OK | os.X_OK):
        return
    code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
    raise OSError(code, os.strerror(code), str(folder))


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 1 << 16).decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file holds no record)"
    text = (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('since', '?')} ({holder.get('command', '?')})")
    if holder.get("host") == platform.node() and isinstance(holder.get("pid"), int) \
            and not pid_alive(holder["pid"]):
        text += ", a dead PID: a child process it started still holds the lock; end that process"
    return text


def _open_locked(path: Path, deadline: float | None) -> int:
    """A descriptor of `path` holding its exclusive flock (waiting for it if need be)."""
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise PipelineError(f"cannot lock {path} ({os.strerror(err.errno)}): its file system "
                                    f"has no flock support; mount it with locking enabled "
                                    f"(NFS: no 'nolock'; Lustre: '-o flock').") from None
            holder = describe_holder(_read_holder(fd))
            os.close(fd)
            if deadline is not None and time.monotonic() >= deadline:
                raise PipelineError(f"{path} is locked by {holder}: another run is writing the same "
                                    f"outputs; wait for it to finish, or raise ${TIMEOUT_VARIABLE}.")
            if not announced:
                logger.warning("waiting for %s, locked by %s", path, holder)
                announced = True
            time.sleep(POLL_SECONDS)
            continue
        try:  # the previous holder may have deleted the file between our open and our lock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _record(fd: int, path: Path) -> None:
    stale = _read_holder(fd)
    if stale.get("pid") is not None:
        logger.info("%s: taking over the lock record of PID %s on host %s, which ended without "
                    "releasing it", path, stale.get("pid"), stale.get("host", "?"))
    record = {"host": platform.node(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv[:8])[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def claim_outputs(files: Iterable[str | os.PathLike] = (), folders: Iterable[str | os.PathLike] = (),
                  timeout: float | None = None) -> list[Path]:
    """Check that every output's folder is writable, then lock each output; held until
    `release_outputs` or process exit. Claims this process already holds are kept as they are.

    :param timeout: seconds to wait for a held lock; None reads $PIPELINE_LOCK_TIMEOUT (unset:
                    wait as long as it takes).
    :return: the lock files now held.
    :raises OSError: an output folder cannot be written (names the folder).
    :raises PipelineError: a lock is still held after `timeout` seconds (names the holder).
    """
    if timeout is None and os.environ.get(TIMEOUT_VARIABLE):
        try:
            timeout = float(os.environ[TIMEOUT_VARIABLE])
        except ValueError:
            raise PipelineError(f"${TIMEOUT_VARIABLE} is {os.environ[TIMEOUT_VARIABLE]!r}; set it to "
                                f"a number of seconds or unset it.") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = [lock_file(f) for f in files] + [lock_file(d, folder=True) for d in folders]
    # Writability of every folder first: nothing is locked (or waited for) in vain.
    for path in wanted:
        _make_folder(path.parent)
        check_writable(path.parent)
    held = []
    for path in wanted:
        key = str(path.resolve())
        if key not in _HELD:
            fd = _open_locked(path, deadline)
            # Inherited across exec: `train --processes N` becomes torchrun in the same process.
            os.set_inheritable(fd, True)
            _record(fd, path)
            _HELD[key] = fd
        held.append(path)
    return held


def release_outputs() -> None:
    """Delete and unlock every lock file this process holds; remove folders a claim created
    that stayed empty (a stage that failed before writing leaves no trace)."""
    for key, fd in list(_HELD.items()):
        # Unlink while still locked: a waiter that locks the old inode sees it is gone and retries.
        with contextlib.suppress(OSError):
            os.unlink(key)
        os.close(fd)
        del _HELD[key]
    for folder in reversed(_CREATED):
        with contextlib.suppress(OSError):
            folder.rmdir()
    _CREATED.clear()



# Stage arguments that name outputs: files, and folders a stage writes into.
OUTPUT_FILE_ARGUMENTS = ("out", "grid", "codes")
OUTPUT_FOLDER_ARGUMENTS = ("out_dir",)


def claim_stage_outputs(args: object) -> list[Path]:
    """`claim_outputs` for the outputs a stage's parsed arguments name (--out, --grid, --codes,
    --out-dir; every Snakemake rule passes them). A stage that computes a default output itself
    claims it with `claim_outputs`. Processes under torchrun claim nothing: the launcher they
    replaced holds the claim (its lock survives the exec)."""
    if "WORLD_SIZE" in os.environ:
        return []
    files = [value for name in OUTPUT_FILE_ARGUMENTS if isinstance(value := getattr(args, name, None), str)]
    folders = [value for name in OUTPUT_FOLDER_ARGUMENTS
               if isinstance(value := getattr(args, name, None), str)]
    return claim_outputs(files, folders)
