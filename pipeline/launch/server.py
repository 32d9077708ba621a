"""The fork server: imports torch, torch_fidelity, torchvision, torch._dynamo and every stage once,
then forks one child per job; the child takes the job's descriptors, cwd, environment and thread
count and runs the stage as a fresh `python -m pipeline` would.

    python -m pipeline.launch.server --socket PATH [--watch-pid PID]

The server never runs a torch operation: OpenMP's thread pool (and CUDA) do not survive fork, and
a child must start from torch's initial state (its default generator at its default seed). It is
single-threaded: one loop over the listening socket, the jobs' connections and SIGCHLD. A job's
connection that closes before its child exits means the client was killed (Snakemake cancelling
the job): the child's process group is killed. Started and stopped by pipeline.launch.control.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import random
import selectors
import signal
import socket
import sys
import traceback

from pipeline.allocator import reexec_with_tuned_allocator
from pipeline.launch import wire

PRELOADED = ("torch", "torchvision", "torch_fidelity", "torch._dynamo")
# Seconds between checks that the watched process (Snakemake) still runs.
WATCH_INTERVAL = 1.0


def preload() -> None:
    """Import what jobs import; nothing here may run a torch operation."""
    from pipeline.cli import STAGES
    for name in (*PRELOADED, "pipeline.cli", *STAGES.values()):
        importlib.import_module(name)


class Server:
    def __init__(self, path: str, watch_pid: int | None, environment: dict[str, str]):
        """`environment`: the server's own before its imports (torch sets variables of its own)."""
        self.path, self.watch_pid = path, watch_pid
        self.fingerprint = wire.fingerprint(environment)
        self.jobs: dict[int, socket.socket] = {}  # child pid -> its client's connection
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        # SIGCHLD and SIGTERM wake the loop through this pipe; the handlers do nothing else.
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        self.stop_requested = False
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        # Listen under a temporary name, then rename: a client never finds a socket not yet listening.
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pending = f"{path}.{os.getpid()}"
        self.listener.bind(pending)
        self.listener.listen(64)
        os.rename(pending, path)
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")

    def stop(self) -> None:
        """Take no new jobs; the loop ends when the running ones have."""
        if not self.stopping:
            self.stopping = True
            self.selector.unregister(self.listener)
            self.listener.close()
            _unlink(self.path)

    def loop(self) -> None:
        while not (self.stopping and not self.jobs):
            for key, _ in self.selector.select(WATCH_INTERVAL):
                if key.data == "listener":
                    self.accept()
                elif key.data == "wake":
                    os.read(self.wake_read, 512)
                else:
                    self.client_gone(key.fileobj, key.data)
            self.reap()
            if self.stop_requested or (self.watch_pid is not None and not _alive(self.watch_pid)):
                self.stop()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(10)
            request, fds = wire.receive_message(conn, max_fds=3)
            refusal = self.refusal(request, fds)
            if refusal:
                wire.send_message(conn, {"refused": refusal})
                conn.close()
                _close_all(fds)
                return
        except (OSError, ValueError) as err:
            print(f"fork server: a request failed ({err})", file=sys.stderr)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.become_child(conn, request, fds)  # never returns
        # The child makes itself a group leader too; both calls, so that the group exists before
        # the client learns the pid and may signal it, whichever process runs first.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child got there first
        _close_all(fds)
        self.jobs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        wire.send_message(conn, {"pid": pid})

    def refusal(self, request: dict | None, fds: list[int]) -> str | None:
        if request is None or len(fds) != len(request.get("targets", ())):
            return "malformed request"
        if request["fingerprint"] != self.fingerprint:
            return f"the job's {mismatch(request['fingerprint'], self.fingerprint)} differ from the server's"
        threads = request["environment"].get("OMP_NUM_THREADS", "")
        if not (threads.isdigit() and int(threads) > 0):
            return "the job sets no OMP_NUM_THREADS (a number), which a forked child must apply itself"
        if request["environment"].get("MKL_NUM_THREADS", threads) != threads:
            return "the job's MKL_NUM_THREADS differs from its OMP_NUM_THREADS (torch sets both as one)"
        return None

    def client_gone(self, conn: socket.socket, pid: int) -> None:
        """The client's end closed while its child runs: the client was killed, so is the job."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if data:
            return
        self.selector.unregister(conn)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.jobs.pop(pid, None)
            if conn is None:
                continue
            try:
                self.selector.unregister(conn)
            except KeyError:
                pass  # already gone: client_gone unregistered it
            try:
                wire.send_message(conn, {"status": status})
            except OSError:
                pass  # the client is gone; nobody waits for this status
            conn.close()

    def become_child(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        code = 1
        try:
            self.detach()
            conn.close()
            become_job(request, fds)
            code = run_stage(request["argv"])
        except BaseException:  # a failure to set up is the job's failure, reported in its log
            traceback.print_exc()
        finally:
            _exit(code)

    def detach(self) -> None:
        """In the child: drop the server's sockets, pipe and signal handlers."""
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for other in self.jobs.values():
            other.close()
        if not self.stopping:
            self.listener.close()
        self.selector.close()
        os.close(self.wake_read)
        os.close(self.wake_write)


def mismatch(job: dict, server: dict) -> str:
    """What differs between two fingerprints, by name (never values: they may be secrets)."""
    parts = [name for name in ("interpreter", "package") if job.get(name) != server.get(name)]
    job_vars, server_vars = job.get("environment", {}), server.get("environment", {})
    names = sorted(k for k in job_vars.keys() | server_vars.keys() if job_vars.get(k) != server_vars.get(k))
    if names:
        parts.append("start-up variables (" + ", ".join(names) + ")")
    return " and ".join(parts) or "fingerprint"


def become_job(request: dict, fds: list[int]) -> None:
    """Give this (forked) process the job's descriptors, directory, environment, threads and fresh
    random state, as a new process started by the job's command would have."""
    for target in (0, 1, 2):
        if target in request["targets"]:
            fd = fds[request["targets"].index(target)]
            os.dup2(fd, target)
        else:
            os.close(target)
    _close_all(fds)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["environment"])
    os.umask(request["umask"])
    sys.argv = [request["argv0"], *request["argv"]]
    _reopen_standard_streams()
    # A new process seeds these from the OS; a fork would share the server's state with every job.
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _reopen_standard_streams() -> None:
    """sys.std* over the new descriptors 0-2, buffered as Python buffers them at start-up."""
    def text(fd: int, old: io.TextIOWrapper | None, mode: str):
        if not wire.is_open(fd):
            return None
        encoding = old.encoding if old is not None else None
        errors = old.errors if old is not None else None
        if mode == "r":
            return open(fd, "r", closefd=False, encoding=encoding, errors=errors)
        binary = open(fd, "wb", closefd=False)
        return io.TextIOWrapper(binary, encoding=encoding, errors=errors, line_buffering=fd == 2 or os.isatty(fd))
    sys.stdin = sys.__stdin__ = text(0, sys.__stdin__, "r")
    sys.stdout = sys.__stdout__ = text(1, sys.__stdout__, "w")
    sys.stderr = sys.__stderr__ = text(2, sys.__stderr__, "w")


def run_stage(argv: list[str]) -> int:
    """`python -m pipeline <argv>` in this process: its exit status as the interpreter would give it."""
    from pipeline.cli import main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """End the child as the interpreter ends a process (atexit handlers, flushed streams), without
    unwinding into the server's loop."""
    try:
        atexit._run_exitfuncs()
    finally:
        _flush()
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd > 2:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument("--watch-pid", type=int, help="stop taking jobs when this process (Snakemake) ends")
    args = parser.parse_args(argv)
    # The children share the server's malloc, whose tunables glibc read when the server started.
    reexec_with_tuned_allocator()
    # One thread per pool while importing: with more, torch's import starts OpenMP's pool, which
    # the children would inherit as a broken copy. Each child sets its job's count (wire.py).
    os.environ.update(wire.SERVER_THREADS)
    environment = dict(os.environ)
    preload()
    server = Server(args.socket, args.watch_pid, environment)
    try:
        server.loop()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
