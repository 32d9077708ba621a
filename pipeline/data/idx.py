"""IDX files (the MNIST family's format), as Fashion-MNIST ships them, plain or gzipped.

Layout: a big-endian header (magic 0x00000803 for uint8 images with three dimensions, then the
count, rows and columns; magic 0x00000801 and the count for labels) followed by raw uint8 data.
Only as many bytes as the requested images are decoded, so a small max_images is quick.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from pipeline.data.base import BLOCK_SIZE, ImageBlock, ImageSource, file_digests, select_count
from pipeline.errors import PipelineError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
SPLIT_FILES = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}

# Upstream md5 sums of the gzipped files at the official URL (Debian's recompressed copies
# differ; their decoded content is checked through the headers and sizes instead).
OFFICIAL_MD5 = {
    f"{TRAIN_IMAGES}.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    f"{TRAIN_LABELS}.gz": "25c81989df183df01b3e8a0aad5dffbe",
    f"{TEST_IMAGES}.gz": "bef4ecab320f06d8554ea6380940ec79",
    f"{TEST_LABELS}.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]

_READ_ERRORS = (OSError, EOFError, zlib.error)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """folder/stem.gz or folder/stem, whichever exists (gzipped preferred)."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_exactly(stream: BinaryIO, size: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(size)
    except _READ_ERRORS as err:
        raise PipelineError(f"{path} is corrupt or truncated while reading {what}: {err}") from None
    if len(data) != size:
        raise PipelineError(f"{path} is truncated: {what} needs {size:,} bytes, the file "
                            f"ends after {len(data):,}.")
    return data


def _check_end(stream: BinaryIO, path: Path) -> None:
    """Reading to the end makes gzip verify its CRC; leftover bytes mean a wrong header."""
    try:
        extra = stream.read(1)
    except _READ_ERRORS as err:
        raise PipelineError(f"{path} is corrupt: {err}") from None
    if extra:
        raise PipelineError(f"{path} holds more data than its header announces: corrupt file.")


class IdxSource(ImageSource):
    """Images and labels of one split from a folder with train-images-idx3-ubyte[.gz] and
    train-labels-idx1-ubyte[.gz] (split "test": t10k-images/-labels), padded with zeros to `resolution` (28 -> 32: 2 px each side).
    A resolution below the file's side is reached by padding to a multiple of it and averaging
    factor x factor boxes (28 -> 16: padded to 32, then 2x2 means, rounded).

    :param expected_count: images the complete file must hold (Fashion-MNIST: 60,000).
    :param max_images: take only the first images (see `select_count`).
    :param label_names: names of the label values (Fashion-MNIST's classes by default).
    :param split: "train" or "test" (which pair of files is read).
    :param test_expected_count: images the complete test files must hold (Fashion-MNIST: 10,000);
                                used by `test_split()`.
    """

    kind = "idx"

    def __init__(self, dataset: str, folder: Path, resolution: int, expected_count: int | None,
                 max_images: int | None = None,
                 label_names: list[str] = FASHION_MNIST_CLASSES, split: str = "train",
                 test_expected_count: int | None = None) -> None:
        folder = Path(folder)
        if split not in SPLIT_FILES:
            raise PipelineError(f"unknown IDX split {split!r}; choose one of {', '.join(SPLIT_FILES)}.")
        images_stem, labels_stem = SPLIT_FILES[split]
        self.split, self.test_expected_count = split, test_expected_count
        self.max_images = max_images
        images_path = find_idx_file(folder, images_stem)
        labels_path = find_idx_file(folder, labels_stem)
        if images_path is None or labels_path is None:
            raise PipelineError(f"{folder} lacks {images_stem}[.gz] or {labels_stem}[.gz] (the "
                                f"IDX files of the {split} split).")
        self.images_path, self.labels_path = images_path, labels_path

        magic, available, rows, cols = struct.unpack(">4I", self._header(images_path, 16))
        if magic != IMAGES_MAGIC:
            raise PipelineError(f"{images_path} is not an IDX image file (magic {magic:#010x}, "
                                f"expected {IMAGES_MAGIC:#010x}).")
        magic, label_count = struct.unpack(">2I", self._header(labels_path, 8))
        if magic != LABELS_MAGIC:
            raise PipelineError(f"{labels_path} is not an IDX label file (magic {magic:#010x}, "
                                f"expected {LABELS_MAGIC:#010x}).")
        if label_count != available:
            raise PipelineError(f"{images_path} holds {available:,} images but {labels_path} "
                                f"{label_count:,} labels: one of them is wrong.")
        self.factor = max(1, -(-rows // resolution))  # box-filter factor: ceil(rows / resolution)
        padded = resolution * self.factor
        if rows != cols or (padded - rows) % 2:
            raise PipelineError(f"{images_path} holds {rows}x{cols} images, which cannot be padded "
                                f"evenly to {padded}x{padded} for {resolution}x{resolution}; use a "
                                f"resolution such as {rows + rows % 2 + 4} or {(rows + 4) // 2}.")
        self.rows, self.available = rows, available
        split_name = "training" if split == "train" else split
        count = select_count(f"{images_path}", available, expected_count, max_images, split_name)
        pad = (padded - rows) // 2
        preprocessing = (f"IDX uint8 {rows}x{cols} grayscale, first {count} {split_name} images in file "
                         f"order, zero-padded by {pad} px on each side to {padded}x{padded}")
        if self.factor > 1:
            preprocessing += f", then {self.factor}x{self.factor} box means (rounded) to {resolution}x{resolution}"
        super().__init__(dataset, folder, count, resolution, 1, list(label_names), preprocessing)

    def test_split(self) -> IdxSource | None:
        """The t10k files beside the training files, all of them, preprocessed alike; None when
        the folder has none (then the calibration floor falls back to held-out training images)."""
        if self.split != "train" or not all(find_idx_file(self.path, stem) for stem in SPLIT_FILES["test"]):
            return None
        # A deliberate training subset (max_images) is a test fixture or a demo: take whatever
        # test images exist instead of demanding the official count.
        expected = self.test_expected_count if self.max_images is None else None
        return IdxSource(self.dataset, self.path, self.resolution, expected,
                         label_names=self.label_names, split="test")

    @staticmethod
    def _header(path: Path, size: int) -> bytes:
        try:
            with _open(path) as stream:
                return _read_exactly(stream, size, path, "the header")
        except _READ_ERRORS as err:
            raise PipelineError(f"{path} is unreadable: {err}") from None

    def blocks(self) -> Iterator[ImageBlock]:
        pixels = self.rows * self.rows
        factor = self.factor
        pad = (self.resolution * factor - self.rows) // 2
        with _open(self.images_path) as images, _open(self.labels_path) as labels:
            _read_exactly(images, 16, self.images_path, "the header")
            _read_exactly(labels, 8, self.labels_path, "the header")
            for start in range(0, self.count, BLOCK_SIZE * 16):
                n = min(BLOCK_SIZE * 16, self.count - start)
                raw = _read_exactly(images, n * pixels, self.images_path, f"images {start}..{start + n - 1}")
                block = np.frombuffer(raw, np.uint8).reshape(n, self.rows, self.rows)
                block = np.pad(block, ((0, 0), (pad, pad), (pad, pad)))
                if factor > 1:
                    side = self.resolution
                    boxes = block.reshape(n, side, factor, side, factor).astype(np.float32)
                    block = np.floor(boxes.mean(axis=(2, 4)) + 0.5).astype(np.uint8)
                block = block[..., None]
                label_raw = _read_exactly(labels, n, self.labels_path, f"labels {start}..{start + n - 1}")
                yield ImageBlock(block, np.frombuffer(label_raw, np.uint8).astype(np.int64))
            if self.count == self.available:
                _check_end(images, self.images_path)
                _check_end(labels, self.labels_path)

    def checksums(self) -> dict[str, Any]:
        result = {}
        for path in (self.images_path, self.labels_path):
            digests = file_digests(path, md5=True)
            official = OFFICIAL_MD5.get(path.name)
            digests["matches_official_md5"] = official is not None and digests["md5"] == official
            result[path.name] = digests
        return result
