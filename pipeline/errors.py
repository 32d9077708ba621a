"""The one exception type a user should ever see from the pipeline, and the one-line wording of
disk errors (full, read-only, permission), which cli.main prints instead of a traceback."""

from __future__ import annotations

import errno
import os


class PipelineError(Exception):
    """Bad input (config, data, checkpoint, missing file) explained in words.

    The CLI prints the message alone, without a traceback, and exits with status 2. The message
    names what is wrong and how to fix it.
    """


# Errors of the disk rather than of the program: full, read-only, not ours.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
DISK_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk (or point config 'results' at another) and rerun",
    errno.EDQUOT: "free space within your quota (or point config 'results' elsewhere) and rerun",
    errno.EROFS: "the file system is read-only: remount it writable or point config 'results' elsewhere",
    errno.EACCES: "no permission: fix the folder's ownership or mode, or point config 'results' elsewhere",
    errno.EPERM: "not permitted: fix the folder's ownership or mode, or point config 'results' elsewhere",
}


def disk_error_message(err: OSError) -> str | None:
    """One line for an OSError of the disk (full, read-only, permission), None for any other."""
    if err.errno not in DISK_ERRNOS:
        return None
    where = err.filename if err.filename else "a file of this stage"
    return f"{where}: {os.strerror(err.errno)}; {DISK_ERROR_FIXES[err.errno]}."
