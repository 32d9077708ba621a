"""Fetching an official file once, checked, and only ever complete on disk."""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path

# Seconds a connect or a single read may stall; an offline machine fails at once (DNS) or
# after this long, never hangs.
TIMEOUT_SECONDS = 20


class DownloadFailed(Exception):
    """The file could not be fetched; the message says why (the caller adds how to fix it)."""


def download(url: str, destination: Path, md5: str | None = None) -> Path:
    """Download `url` to `destination` through a temporary file, checking its md5 if given.

    :raises DownloadFailed: network errors (offline, timeout, HTTP status).
    :raises PipelineError: the file arrived but its md5 is wrong.
    """
    destination = Path(destination)
    digest = hashlib.md5()
    try:
        with atomic_path(destination) as tmp:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, open(tmp, "wb") as out:
                while piece := response.read(1 << 20):
                    digest.update(piece)
                    out.write(piece)
            if md5 is not None and digest.hexdigest() != md5:
                raise PipelineError(f"downloaded {url} has md5 {digest.hexdigest()}, not the official "
                                    f"{md5}: the transfer was corrupted; run again.")
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        raise DownloadFailed(f"Downloading {url} failed: {getattr(err, 'reason', err)}") from None
    return destination
