"""File hashes recorded in provenance (weights, FID extractor weights, source data)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, remembered per (real path, mtime, size) within the process.

    The Inception weights are 91 MB; a stage that checks and records a hash should read them
    once, and an edited file (new mtime or size) is hashed again.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
