"""Content hashes stored inside every artifact, and the readers that check them.

A damaged disk can change bytes in the middle of a file without truncating it; HDF5 and torch's
zip reader then hand back wrong numbers. Every artifact therefore carries SHA-256 hashes of its
contents, written inside the file (so they are renamed into place with it) and checked on read:

* HDF5: each dataset has an attribute `content_sha256` (its element bytes in C order), and the
  root has `attrs_sha256` (its other attributes, as canonical JSON). `seal_h5` adds them just
  before the file is closed; `verify_h5` streams every dataset in slabs (one sequential read of
  the file: decompression plus SHA-256, about 1-2 s per GB on one core) and remembers files it has
  checked, per (path, inode, size, mtime), for the rest of the process.
* zip containers (torch.save files, np.savez sample chunks): one extra record
  `.content_sha256` holds the hash of every other record (name and bytes). torch.load and np.load
  ignore the extra record, so a weights file stays a plain state_dict for any other tool.
  `verify_zip` reads every record once; zipfile also checks each record's CRC-32 on the way.
  The record carries a fixed date, so a sealed torch file is byte-identical between identical
  runs (time and host belong in HDF5 provenance attributes, never in a weights file).

A failed check raises `DamagedFile`, a PipelineError naming the file, what is wrong and the fix.
torch files are only ever read with weights_only=True (`load_torch`): no pickle in them can run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path

CONTENT_ATTR = "content_sha256"
ATTRS_ATTR = "attrs_sha256"
ZIP_RECORD = ".content_sha256"
SLAB_BYTES = 32 << 20
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold

_VERIFIED: set[tuple[str, int, int, int]] = set()


class DamagedFile(PipelineError):
    """An artifact whose bytes are not what its writer wrote (or that was never sealed)."""


def _file_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


# ------------------------------------------------------------------------------------------
# HDF5.

def _dataset_sha256(dataset: h5py.Dataset) -> str:
    digest = hashlib.sha256()
    if dataset.dtype.kind in "OSUV" or dataset.ndim == 0:
        # Strings, variable-length and scalar entries are small: hash their values as JSON.
        value = dataset[()]
        value = value.tolist() if isinstance(value, np.ndarray) else value
        digest.update(json.dumps(_plain(value), sort_keys=True).encode())
        return digest.hexdigest()
    row_bytes = max(1, int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize)
    rows = max(1, SLAB_BYTES // row_bytes)
    if dataset.chunks:  # whole chunks per slab: every chunk is decompressed once
        rows = max(dataset.chunks[0], rows // dataset.chunks[0] * dataset.chunks[0])
    for start in range(0, dataset.shape[0], rows):
        slab = np.ascontiguousarray(dataset[start:start + rows])
        digest.update(slab.astype(slab.dtype.newbyteorder("<"), copy=False).data)  # no copy on x86
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def _attrs_sha256(f: h5py.File) -> str:
    attrs = {key: _plain(f.attrs[key]) for key in sorted(f.attrs) if key != ATTRS_ATTR}
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def seal_h5(f: h5py.File) -> None:
    """Record the hash of every dataset and of the root attributes; call last, before closing."""
    f.flush()
    for dataset in _datasets(f):
        dataset.attrs[CONTENT_ATTR] = _dataset_sha256(dataset)
    f.attrs[ATTRS_ATTR] = _attrs_sha256(f)


def verify_h5(f: h5py.File, path: str | os.PathLike, fix: str) -> None:
    """Check every hash `seal_h5` wrote into the open file `f` (read from `path`).

    :param fix: what the user should do, e.g. "delete it and rerun `python -m pipeline prepare`".
    :raises DamagedFile: a hash is missing or differs, or HDF5 cannot read a chunk.
    """
    path = Path(path)
    try:
        key = _file_key(path)
        if key in _VERIFIED:
            return
        if ATTRS_ATTR not in f.attrs:
            raise DamagedFile(f"{path} carries no content checksum (written by an older version, or "
                              f"not by this pipeline); {fix}.")
        if f.attrs[ATTRS_ATTR] != _attrs_sha256(f):
            raise DamagedFile(f"{path} is damaged: its attributes do not match their checksum; {fix}.")
        for dataset in _datasets(f):
            stored = dataset.attrs.get(CONTENT_ATTR)
            if stored is None:
                raise DamagedFile(f"{path} is damaged: dataset '{dataset.name}' has no checksum; {fix}.")
            if _dataset_sha256(dataset) != stored:
                raise DamagedFile(f"{path} is damaged: dataset '{dataset.name}' does not match its "
                                  f"checksum; {fix}.")
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # HDF5 read errors of torn chunks
        raise DamagedFile(f"{path} is damaged: HDF5 cannot read it ({_first_line(err)}); {fix}.") from None
    _VERIFIED.add(key)


@contextlib.contextmanager
def open_verified_h5(path: str | os.PathLike, fix: str) -> Iterator[h5py.File]:
    """An HDF5 file opened for reading after `verify_h5`; an unreadable file is a DamagedFile."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DamagedFile(f"{path} is not a readable HDF5 file ({_first_line(err)}); {fix}.") from None
    with f:
        verify_h5(f, path, fix)
        yield f


@contextlib.contextmanager
def sealed_h5(final: str | os.PathLike) -> Iterator[h5py.File]:
    """A new HDF5 file written under a temporary name, sealed, closed, then renamed to `final`.

    On failure (the block's or the disk's) the file is closed before its temporary name is removed: an HDF5 file left open
    is flushed at interpreter exit, which on a full disk fails again and ends in a segmentation
    fault. So that this close can succeed on a full disk, the file is first truncated to zero,
    giving back its space (its contents are discarded anyway).
    """
    with atomic_path(final) as tmp:
        # No chunk cache: a chunk that cannot be written (full disk) then fails the write call
        # itself. With a cache the failure surfaces in a destructor, where h5py only prints it,
        # and the next flush crashes the interpreter.
        f = h5py.File(tmp, "w", rdcc_nbytes=0)
        try:
            yield f
            seal_h5(f)
            f.close()
        except BaseException:
            _discard_h5(f, tmp)
            raise


def _discard_h5(f: h5py.File, tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.truncate(tmp, 0)
    with contextlib.suppress(Exception):
        f.close()


def artifact_sha256(path: str | os.PathLike, fix: str) -> str:
    """The identity of an artifact that a downstream file records: equal for two identical runs.

    For a sealed HDF5 file, SHA-256 of its dataset hashes and its root attributes except the
    volatile ones (host, time, durations: `VOLATILE_ATTRS`), as canonical JSON; the file is
    verified first, so the stored dataset hashes are its contents. Any other file (sealed torch
    files are byte-reproducible): SHA-256 of its bytes.
    """
    from pipeline.io.hashing import file_sha256
    from pipeline.io.provenance import stable_attrs

    path = Path(path)
    if not h5py.is_hdf5(path):
        return file_sha256(path)
    with open_verified_h5(path, fix) as f:
        identity = {
            "datasets": {dataset.name: str(dataset.attrs[CONTENT_ATTR]) for dataset in _datasets(f)},
            "attrs": stable_attrs({key: _plain(f.attrs[key]) for key in f.attrs if key != ATTRS_ATTR}),
        }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# zip containers: torch.save files and np.savez chunks.

def _zip_sha256(archive: zipfile.ZipFile) -> str:
    digest = hashlib.sha256()
    for name in sorted(n for n in archive.namelist() if not n.endswith(ZIP_RECORD)):
        digest.update(name.encode() + b"\0")
        with archive.open(name) as record:
            for block in iter(lambda: record.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def seal_zip(path: str | os.PathLike) -> None:
    """Append the `.content_sha256` record to the zip file at `path` (beside the first record,
    since torch's reader wants every record under one top folder)."""
    with zipfile.ZipFile(path, "a") as archive:
        first = archive.namelist()[0]
        folder = first.split("/")[0] + "/" if "/" in first else ""
        # A fixed date (torch's own records carry one too): the file's bytes are a function of
        # its contents, so identical runs write identical files and hashes of them agree.
        record = zipfile.ZipInfo(folder + ZIP_RECORD, date_time=ZIP_DATE_TIME)
        record.external_attr = 0o644 << 16
        archive.writestr(record, _zip_sha256(archive))


def verify_zip(path: str | os.PathLike, fix: str) -> None:
    """Check the `.content_sha256` record of a zip file; :raises DamagedFile: otherwise."""
    path = Path(path)
    try:  # another process may delete a damaged cache meanwhile: then it is missing, i.e. unusable
        key = _file_key(path)
        if key in _VERIFIED:
            return
        with zipfile.ZipFile(path) as archive:
            stored = [n for n in archive.namelist() if n.endswith(ZIP_RECORD)]
            if len(stored) != 1:
                raise DamagedFile(f"{path} carries no content checksum (written by an older version, "
                                  f"or not by this pipeline); {fix}.")
            expected = archive.read(stored[0]).decode(errors="replace")
            if _zip_sha256(archive) != expected:
                raise DamagedFile(f"{path} is damaged: its contents do not match their checksum; {fix}.")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise DamagedFile(f"{path} is damaged: {_first_line(err)}; {fix}.") from None
    _VERIFIED.add(key)


class _WriteErrorRecorder:
    """A file wrapper that keeps the OSError of a failed write: torch.save turns it into a
    RuntimeError that says neither "disk full" nor the file's name."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj: object, final: str | os.PathLike) -> None:
    """torch.save to a temporary name, sealed and fsynced, then renamed to `final`."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            writer = _WriteErrorRecorder(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise OSError(writer.error.errno, os.strerror(writer.error.errno), str(final)) from None
        seal_zip(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def load_torch(path: str | os.PathLike, fix: str) -> Any:
    """A file written by `save_torch`, checked, then read with weights_only=True (tensors and
    plain containers only; any other pickle content is refused, never run)."""
    path = Path(path)
    verify_zip(path, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        raise DamagedFile(f"{path} cannot be read as tensors ({type(err).__name__}: "
                          f"{_first_line(err)}); {fix}.") from None


def load_torch_unsealed(path: str | os.PathLike, what: str) -> Any:
    """A third-party torch file (not written here, so without our hash) read with weights_only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PipelineError(f"{what} {path} cannot be read as plain tensors ({type(err).__name__}: "
                            f"{_first_line(err)}); replace it with the official file.") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def discard_if_damaged(path: Path, verify: Callable[[Path], None], warn: Callable[[str], None]) -> bool:
    """For resumable caches: True if `path` passed `verify`; else delete it, warn, return False."""
    try:
        verify(path)
        return True
    except DamagedFile as err:
        warn(f"warning: discarding {path} and recomputing it: {err}")
        path.unlink(missing_ok=True)
        return False
