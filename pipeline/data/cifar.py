"""CIFAR-10's python version: the official tarball or its extracted cifar-10-batches-py/ folder.

The training set is five pickled batches (data_batch_1..5), each a dict with "data", a uint8
array (n, 3072) of channel-planar 32x32 RGB images, and "labels", a list of n class indices.
The pickles are read with an unpickler that only builds numpy arrays, so a tampered file cannot
run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from pipeline.data.base import (BLOCK_SIZE, ArraySource, ImageBlock, ImageSource, file_digests,
                                select_count)
from pipeline.errors import PipelineError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TRAIN_BATCHES = tuple(CIFAR10_BATCH_MD5)
TEST_BATCH = "test_batch"
TEST_BATCH_MD5 = "40351d587109b95175f43aff81a1287e"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

# What a batch pickle may reference: numpy's array reconstruction (under its numpy 1 or 2 module
# name) and the codec Python 3 uses for bytes in protocol-2 pickles.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            # Same function under either name; importing the current one avoids numpy 2's
            # deprecation warning for numpy.core.
            return np.ndarray.__reduce__(np.zeros(0))[0]
        return super().find_class(module, name)


def load_batch(stream: BinaryIO, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images (n, 32, 32, 3) uint8 and labels (n,) int64."""
    try:
        batch = _ArrayUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as err:
        raise PipelineError(f"{name} is corrupt or truncated (not a readable CIFAR batch): {err}") from None
    if not isinstance(batch, dict):
        raise PipelineError(f"{name} is not a CIFAR batch (a pickled dict).")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32 or labels is None or len(labels) != len(data)):
        raise PipelineError(f"{name} is not a CIFAR-10 batch: expected 'data' uint8 (n, 3072) and "
                            f"n 'labels'.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


class CifarSource(ImageSource):
    """The CIFAR-10 training batches from the tarball or the extracted folder; test_batch, when
    present, is the test split (`test_split()`).

    :param path: cifar-10-python.tar.gz, or a folder holding data_batch_1..5 (directly or in
                 cifar-10-batches-py/).
    :param official_checksums: check the official md5 sums (tarball, or each batch file); tests
                               with hand-made fixtures turn this off.
    :param expected_count: images the complete set must hold (CIFAR-10: 50,000).
    """

    def __init__(self, dataset: str, path: Path, resolution: int = 32,
                 expected_count: int | None = 50_000, max_images: int | None = None,
                 official_checksums: bool = True) -> None:
        path = Path(path)
        if resolution != 32:
            raise PipelineError(f"{dataset}: CIFAR-10 images are 32x32; set resolution: 32 "
                                f"(got {resolution}).")
        self.official_checksums = official_checksums
        self._test: tuple[np.ndarray, np.ndarray] | None = None
        if path.is_file():
            self.kind = "cifar10-tarball"
            self._checksums = {path.name: self._verify_tarball(path)}
            images, labels = self._read_tarball(path)
        else:
            folder = path / CIFAR10_FOLDER if (path / CIFAR10_FOLDER).is_dir() else path
            self.kind = "cifar10-batches"
            images, labels, self._checksums = self._read_folder(folder)
        count = select_count(f"{path}", len(images), expected_count, max_images)
        self._images, self._labels = images[:count], labels[:count]
        preprocessing = (f"CIFAR-10 python batches data_batch_1..5 in order, first {count} images, "
                         f"channel-planar rows reshaped to 32x32x3; no resizing")
        super().__init__(dataset, path, count, 32, 3, list(CIFAR10_CLASSES), preprocessing)

    def _verify_tarball(self, path: Path) -> dict[str, Any]:
        digests = file_digests(path, md5=True)
        if self.official_checksums and digests["md5"] != CIFAR10_TARBALL_MD5:
            raise PipelineError(
                f"{path} has md5 {digests['md5']}, not the official {CIFAR10_TARBALL_MD5}: the "
                f"tarball is corrupt or truncated. Delete it and download {CIFAR10_URL} again.")
        digests["md5_checked_against_official"] = self.official_checksums
        return digests

    def _read_tarball(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and (base in TRAIN_BATCHES or base == TEST_BATCH):
                        data = tar.extractfile(member).read()
                        found[base] = load_batch(io.BytesIO(data), f"{path}:{member.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise PipelineError(f"{path} is corrupt or truncated (tar/gzip error: {err}).") from None
        missing = [name for name in TRAIN_BATCHES if name not in found]
        if missing:
            raise PipelineError(f"{path} lacks {', '.join(missing)}: truncated or not the CIFAR-10 "
                                f"python tarball.")
        self._test = found.get(TEST_BATCH)
        return (np.concatenate([found[name][0] for name in TRAIN_BATCHES]),
                np.concatenate([found[name][1] for name in TRAIN_BATCHES]))

    def _read_folder(self, folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        missing = [name for name in TRAIN_BATCHES if not (folder / name).is_file()]
        if missing:
            raise PipelineError(f"{folder} lacks {', '.join(missing)}: not an extracted "
                                f"{CIFAR10_FOLDER}/ folder, or an incomplete one.")
        images, labels, checksums = [], [], {}
        for name in TRAIN_BATCHES:
            raw = (folder / name).read_bytes()
            md5 = hashlib.md5(raw).hexdigest()
            if self.official_checksums and md5 != CIFAR10_BATCH_MD5[name]:
                raise PipelineError(f"{folder / name} has md5 {md5}, not the official "
                                    f"{CIFAR10_BATCH_MD5[name]}: the file is corrupt or truncated.")
            checksums[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "md5": md5,
                               "md5_checked_against_official": self.official_checksums}
            batch_images, batch_labels = load_batch(io.BytesIO(raw), str(folder / name))
            images.append(batch_images)
            labels.append(batch_labels)
        if (folder / TEST_BATCH).is_file():
            raw = (folder / TEST_BATCH).read_bytes()
            md5 = hashlib.md5(raw).hexdigest()
            if self.official_checksums and md5 != TEST_BATCH_MD5:
                raise PipelineError(f"{folder / TEST_BATCH} has md5 {md5}, not the official {TEST_BATCH_MD5}: "
                                    f"the file is corrupt or truncated.")
            checksums[TEST_BATCH] = {"sha256": hashlib.sha256(raw).hexdigest(), "md5": md5,
                                     "md5_checked_against_official": self.official_checksums}
            self._test = load_batch(io.BytesIO(raw), str(folder / TEST_BATCH))
        return np.concatenate(images), np.concatenate(labels), checksums

    def blocks(self) -> Iterator[ImageBlock]:
        for start in range(0, self.count, BLOCK_SIZE * 16):
            stop = min(start + BLOCK_SIZE * 16, self.count)
            yield ImageBlock(self._images[start:stop], self._labels[start:stop])

    def checksums(self) -> dict[str, Any]:
        return self._checksums

    def test_split(self) -> ImageSource | None:
        if self._test is None:
            return None
        images, labels = self._test
        checksums = {TEST_BATCH: self._checksums.get(TEST_BATCH, "inside the tarball, see source_checksums")}
        return ArraySource(self.dataset, self.path, f"{self.kind}-test", images, labels, self.label_names,
                           f"CIFAR-10 python batch {TEST_BATCH}, all {len(images)} images, channel-planar rows "
                           f"reshaped to 32x32x3; no resizing", checksums)
