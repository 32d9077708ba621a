"""`python -m pipeline.launch <stage> ...`: run a stage through this machine's fork server if there is
one, else in this process exactly as `python -m pipeline` does. Imports nothing heavy: the client's
own start-up is the job's overhead.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import Sequence

from pipeline.allocator import reexec_with_tuned_allocator, tuned_environment
from pipeline.launch import wire

# Signals a job's process can get from Snakemake or a terminal: the child gets them too.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# No server listening at the path: run in this process, as on a cluster node.
NO_SERVER = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(wire.SOCKET_VARIABLE)
    if path and path != wire.OFF:
        status = run_through_server(path, argv)
        if status is not None:
            return status
    # Its own process from here on (a cluster job, a plain shell): glibc's tunables first.
    reexec_with_tuned_allocator()
    from pipeline.cli import main as run_stage
    return run_stage(argv)


def run_through_server(path: str, argv: list[str]) -> int | None:
    """The stage's exit status from a forked child, or None when no server takes the job."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        if err.errno in NO_SERVER:
            return None
        raise
    with sock:
        # Our standard descriptors go to the child: it writes into this job's log, reads its stdin.
        targets = [fd for fd in (0, 1, 2) if wire.is_open(fd)]
        # The environment this job would have in a process of its own, which re-executes itself
        # with the malloc tunables (pipeline/allocator.py); the server has them too.
        environment = tuned_environment(os.environ) or dict(os.environ)
        request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "environment": environment,
                   "umask": _umask(), "targets": targets, "fingerprint": wire.fingerprint(environment)}
        wire.send_message(sock, request, targets)
        reply, _ = wire.receive_message(sock)
        if reply is None:
            return None
        if "refused" in reply:
            print(f"note: fork server: {reply['refused']}; running the stage in this process", file=sys.stderr)
            return None
        child = reply["pid"]
        for sig in FORWARDED:
            signal.signal(sig, lambda number, _frame: _forward(child, number))
        try:
            done, _ = wire.receive_message(sock)
        except ConnectionError:
            done = None
    if done is None:
        print("error: the fork server stopped while it ran this job; rerun it", file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(done["status"])
    if code < 0:
        # Die of the same signal, so that a shell or Snakemake sees what the child saw.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _forward(child: int, number: int) -> None:
    try:
        os.killpg(child, number)
    except ProcessLookupError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
