"""What every source reader provides, and the helpers the readers share.

A reader is opened (and its size checked) before any image is decoded, so the HDF5 writer knows
the final shape up front and a truncated source fails before minutes of work. Its `blocks()`
then yields the images in a fixed order, and `checksums()` describes exactly the bytes it read.
"""

from __future__ import annotations

import abc
import hashlib
import io
import itertools
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline.data.resize import center_crop_arr
from pipeline.errors import PipelineError

# Images decoded per block: small enough to bound memory at 64x64x3, big enough to keep a
# process pool busy.
BLOCK_SIZE = 256


@dataclass
class ImageBlock:
    """Consecutive images of a source: images (B, H, W, C) uint8, labels (B,) int64 or None."""

    images: np.ndarray
    labels: np.ndarray | None = None


class ImageSource(abc.ABC):
    """An opened, validated source of `count` square uint8 images.

    :param dataset: dataset name (a key of config 'datasets').
    :param path: the file or folder read.
    :param count: number of images `blocks()` yields.
    :param resolution: side of every yielded image.
    :param channels: 1 (grayscale) or 3 (RGB).
    :param label_names: class names when the source has labels, else None.
    :param preprocessing: what was done to the raw images, in words (stored with the data).
    """

    kind: str = ""

    def __init__(self, dataset: str, path: Path, count: int, resolution: int, channels: int,
                 label_names: list[str] | None, preprocessing: str) -> None:
        self.dataset = dataset
        self.path = Path(path)
        self.count = count
        self.resolution = resolution
        self.channels = channels
        self.label_names = label_names
        self.preprocessing = preprocessing

    @abc.abstractmethod
    def blocks(self) -> Iterator[ImageBlock]:
        """Yield the images in source order; raises PipelineError on a corrupt record."""

    @abc.abstractmethod
    def checksums(self) -> dict[str, Any]:
        """Digests of what was read, JSON-ready; complete once `blocks()` is exhausted."""

    def describe(self) -> str:
        return f"{self.dataset} {self.kind} {self.path}"

    def test_split(self) -> "ImageSource | None":
        """The dataset's official held-out test split with the same preprocessing, or None when
        the source has none (LSUN Tower, FFHQ, image folders)."""
        return None


class ArraySource(ImageSource):
    """Images already in memory: images (N, H, W, C) uint8, labels (N,) int64 or None."""

    def __init__(self, dataset: str, path: Path, kind: str, images: np.ndarray, labels: np.ndarray | None,
                 label_names: list[str] | None, preprocessing: str, checksums: dict[str, Any]) -> None:
        self.kind = kind
        self._images, self._labels, self._checksums = images, labels, checksums
        super().__init__(dataset, path, len(images), images.shape[1], images.shape[3], label_names,
                         preprocessing)

    def blocks(self) -> Iterator[ImageBlock]:
        for start in range(0, self.count, BLOCK_SIZE * 16):
            stop = min(start + BLOCK_SIZE * 16, self.count)
            yield ImageBlock(self._images[start:stop],
                             None if self._labels is None else self._labels[start:stop])

    def checksums(self) -> dict[str, Any]:
        return self._checksums


def select_count(what: str, available: int, expected: int | None, max_images: int | None,
                 split: str = "training") -> int:
    """How many images to take from a source that holds `available`.

    Without max_images a dataset of known size must hold exactly `expected` images: anything else
    means a truncated download or a different set. With max_images the first
    min(max_images, expected) are taken and must exist. Unknown sizes (expected None, LSUN) take
    whatever there is, capped by max_images.
    """
    if available == 0:
        raise PipelineError(f"{what} holds no images.")
    if max_images is None:
        if expected is not None and available != expected:
            raise PipelineError(
                f"{what} holds {available:,} images but the official {split} set has "
                f"{expected:,}: the source is truncated or not the official one. Obtain it "
                f"again, or set max_images to use a subset on purpose.")
        return available
    if expected is None:
        return min(available, max_images)
    wanted = min(max_images, expected)
    if available < wanted:
        raise PipelineError(
            f"{what} holds only {available:,} images, fewer than the {wanted:,} asked for "
            f"(max_images): the source is truncated.")
    return wanted


def file_digests(path: Path, md5: bool = False) -> dict[str, str]:
    """sha256 (and md5 when asked) of a whole file, read in 1 MiB pieces."""
    sha = hashlib.sha256()
    md = hashlib.md5() if md5 else None
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            sha.update(piece)
            if md is not None:
                md.update(piece)
    digests = {"sha256": sha.hexdigest()}
    if md is not None:
        digests["md5"] = md.hexdigest()
    return digests


class RecordDigest:
    """sha256 over a sequence of named records: (name length, name, size, bytes) for each.

    Folders and LMDBs are digested this way instead of file by file: the digest covers exactly
    the records used (max_images may stop early) and fixes their order.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.records = 0

    def update(self, name: bytes, payload: bytes) -> None:
        for part in (name, payload):
            self._sha.update(len(part).to_bytes(8, "little"))
            self._sha.update(part)
        self.records += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def decode_image(payload: bytes, name: str, resolution: int, mode: str) -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, WebP, ...) and centre-crop it to the resolution.

    :param payload: the encoded bytes.
    :param name: what to call the image in an error (file path or LMDB key).
    :param mode: PIL mode to convert to, "RGB" or "L".
    :return: (resolution, resolution, C) uint8.
    """
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            converted = image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PipelineError(f"unreadable image {name}: {err}") from None
    array = center_crop_arr(converted, resolution)
    return array.reshape(resolution, resolution, -1)


def decode_blocks(records: Iterable[tuple[str, bytes]], resolution: int, mode: str,
                  workers: int = 1) -> Iterator[np.ndarray]:
    """Decode (name, payload) records into blocks of (B, resolution, resolution, C) uint8.

    With workers > 1 a process pool decodes each block; blocks keep the record order, and only
    one block of encoded bytes is in flight, so memory stays bounded on huge sources.
    """
    records = iter(records)
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        while True:
            chunk = list(itertools.islice(records, BLOCK_SIZE))
            if not chunk:
                return
            jobs = [(payload, name, resolution, mode) for name, payload in chunk]
            if pool is None:
                arrays = [decode_image(*job) for job in jobs]
            else:
                arrays = pool.starmap(decode_image, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
            yield np.stack(arrays)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
