"""Start and stop the fork server from the Snakefile (onstart / onsuccess / onerror).

Only a local run starts one: jobs on cluster nodes are processes of their own and find no socket
on their node (the client then runs the stage itself). The socket's path goes into this process's
environment, which every local job inherits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from pipeline.launch import wire

# Seconds to wait for the server's imports; jobs that start before it is ready run in-process anyway.
READY_TIMEOUT = 120.0
# Unix socket paths hold at most 107 bytes on Linux.
MAX_SOCKET_PATH = 100


class ForkServer:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.path: str | None = None

    def start(self, local: bool = True) -> bool:
        """Start a server for the jobs of this process; False (and the jobs run as before) when this is
        not a local run, PIPELINE_FORK_SERVER=off, or the server did not come up."""
        if not local or os.environ.get(wire.SOCKET_VARIABLE) == wire.OFF or self.process is not None:
            return False
        path = os.path.join(tempfile.gettempdir(), f"pipeline-fork-{os.getuid()}-{os.getpid()}.sock")
        if len(path.encode()) > MAX_SOCKET_PATH:
            print(f"note: no fork server: the socket path {path} is too long for a Unix socket; set "
                  f"TMPDIR to a shorter folder", file=sys.stderr)
            return False
        # Its own session: a Ctrl-C to Snakemake's terminal reaches the jobs (their clients forward
        # it), not the server, which ends once Snakemake has and its running jobs have finished.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.launch.server", "--socket", path, "--watch-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                print("note: the fork server did not start; every job imports torch itself", file=sys.stderr)
                self.stop()
                return False
            time.sleep(0.05)
        self.path = path
        os.environ[wire.SOCKET_VARIABLE] = path
        return True

    def stop(self) -> None:
        """Ask the server to end (it finishes running jobs first) and drop the variable."""
        if self.path is not None and os.environ.get(wire.SOCKET_VARIABLE) == self.path:
            del os.environ[wire.SOCKET_VARIABLE]
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # still finishing a job; it exits on its own once that ends
        self.process, self.path = None, None
