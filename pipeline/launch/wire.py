"""What client and server share: the socket's variable, message framing, the request's fingerprint.

Light on purpose: the client imports this module and nothing else from the package.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

# Path of the server's Unix socket; set in the environment of the jobs of a local Snakemake run.
SOCKET_VARIABLE = "PIPELINE_FORK_SERVER"
# `PIPELINE_FORK_SERVER=off snakemake ...`: no server, every job its own process as before.
OFF = "off"
_LENGTH = struct.Struct("!I")

# Variables read when torch, OpenMP, MKL, OpenBLAS, Python or glibc (GLIBC_TUNABLES) start: a forked
# child would keep the server's values, so a job whose values differ runs in its own process instead.
# The server imports with one thread of each pool (OMP_, MKL_ and OPENBLAS_NUM_THREADS=1); the child
# applies the job's OMP_NUM_THREADS and MKL_NUM_THREADS (torch.set_num_threads sets both) before its
# first operation. OpenBLAS (numpy, scipy) cannot be widened after fork: jobs with
# OPENBLAS_NUM_THREADS other than 1 (Snakemake sets it to the job's threads) run in their own process.
IMPORT_TIME_PREFIXES = ("PYTHON", "TORCH", "PYTORCH", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "LD_",
                        "CUDA_", "NVIDIA_", "TORCHINDUCTOR_", "TRITON_", "MALLOC_", "GLIBC_")
APPLIED_IN_CHILD = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", SOCKET_VARIABLE}
SERVER_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def fingerprint(environ: dict[str, str]) -> dict:
    """What must match between a job and the server for a fork to equal a fresh process: the
    interpreter, the pipeline package's folder and the start-up variables."""
    import pipeline
    return {
        "interpreter": [os.path.realpath(sys.executable), sys.prefix, sys.version],
        "package": os.path.realpath(os.path.dirname(pipeline.__file__)),
        "environment": {k: v for k, v in sorted(environ.items())
                        if k.startswith(IMPORT_TIME_PREFIXES) and k not in APPLIED_IN_CHILD},
    }


def send_message(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    """One JSON message, length-prefixed; `fds` travel with the length (SCM_RIGHTS)."""
    body = json.dumps(message).encode()
    header = _LENGTH.pack(len(body))
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    sock.sendall(body)


def receive_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) at end of stream."""
    if max_fds:
        header, fds, _flags, _addr = socket.recv_fds(sock, _LENGTH.size, max_fds)
    else:
        header, fds = sock.recv(_LENGTH.size), []
    if not header:
        return None, fds
    header += _read_exactly(sock, _LENGTH.size - len(header))
    (length,) = _LENGTH.unpack(header)
    return json.loads(_read_exactly(sock, length)), fds


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("fork server connection closed mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def is_open(fd: int) -> bool:
    """Whether descriptor `fd` is open (a job may run with stdin closed)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
