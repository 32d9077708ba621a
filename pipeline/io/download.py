"""The one download helper: torch.hub's download_url_to_file (temporary file, then rename) with
the official digest checked before the file gets its final name."""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
from pathlib import Path

import torch.hub

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path

# Seconds a connect or a single read may stall: an offline machine fails at once (DNS) or after
# this long, never hangs (download_url_to_file itself sets no timeout).
TIMEOUT_SECONDS = 20

logger = logging.getLogger(__name__)


class DownloadFailed(Exception):
    """The file could not be fetched; the message says why (the caller adds how to fix it)."""


def download(url: str, destination: str | Path, md5: str | None = None,
             sha256_prefix: str | None = None, timeout: float = TIMEOUT_SECONDS) -> Path:
    """Fetch `url` to `destination`, which appears only complete and with the expected digest.

    :param md5: the official MD5 (dataset archives publish these).
    :param sha256_prefix: the leading hex digits of the SHA-256 (torch hub's file-name convention).
    :raises DownloadFailed: network errors (offline, timeout, HTTP status).
    :raises PipelineError: the file arrived but its digest is wrong (nothing is kept).
    """
    destination = Path(destination)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with atomic_path(destination) as tmp:
            logger.info("downloading %s to %s", url, destination)
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=sha256_prefix, progress=False)
            if md5 is not None:
                got = hashlib.md5(tmp.read_bytes()).hexdigest()
                if got != md5:
                    raise PipelineError(f"downloaded {url} has md5 {got}, not the official {md5}: the "
                                        f"transfer was corrupted; run again.")
    except RuntimeError as err:  # download_url_to_file's digest mismatch
        raise PipelineError(f"downloaded {url} is not the official file ({err}); run again.") from None
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        raise DownloadFailed(f"Downloading {url} failed: {getattr(err, 'reason', err)}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return destination
