"""data.h5: a prepared image set, written once by `prepare` and read by training and metrics.

Layout:
* "images": uint8 (N, H, W, C), gzip level 4, chunks of whole images (at most 64 per chunk and
  about 64 KiB, so reading one random image decompresses little). gzip rather than lzf: on
  Fashion-MNIST it writes 0.7 s vs 0.2 s and reads 0.21 s vs 0.12 s for the whole set, but the
  file is 12% smaller and any HDF5 tool can open it (lzf needs h5py's plugin).
* "labels": int64 (N,), only when the dataset has labels.
* "test_images" uint8 (M, H, W, C) and "test_labels" int64 (M,): the official test split, same
  preprocessing, only when the source has one (Fashion-MNIST's t10k files, CIFAR-10's
  test_batch). Training never reads them; they are the calibration floor's held-out images.
  The datasets' own attributes hold count, source, source_kind, preprocessing, checksums (JSON).
* attributes: dataset, source_kind, source_path, preprocessing, resolution, channels, count,
  source_checksums (JSON), label_names (JSON, with labels), test_count (0 without a test
  split), wall_seconds, plus the stage's provenance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from pipeline.data.base import ImageSource
from pipeline.errors import PipelineError
from pipeline.io.integrity import sealed_h5, verify_h5
from pipeline.io.provenance import write_attrs
from pipeline.progress import Progress

CHUNK_BYTES = 64 * 1024
MAX_CHUNK_IMAGES = 64
# read_rows: below 1/SPARSE_FRACTION of the rows, read row by row; above, scan slabs this big.
SPARSE_FRACTION = 64
SLAB_BYTES = 32 << 20
TEST_IMAGES, TEST_LABELS = "test_images", "test_labels"

logger = logging.getLogger(__name__)


def chunk_images(image_shape: tuple[int, int, int]) -> int:
    """Images per HDF5 chunk for (H, W, C) images: about CHUNK_BYTES, 1..MAX_CHUNK_IMAGES."""
    return max(1, min(MAX_CHUNK_IMAGES, CHUNK_BYTES // int(np.prod(image_shape))))


def write_image_set(out: str | Path, source: ImageSource, extra_attrs: Mapping[str, Any],
                    progress: bool = True) -> None:
    """Read every image of `source` into `out`; the file appears only once complete.

    :param extra_attrs: more attributes (the stage's provenance), scalars or strings.
    :raises PipelineError: from the source (corrupt record) or if it yields the wrong number of
                           images; nothing is left under `out` or its temporary name then.
    """
    start = time.perf_counter()
    test = source.test_split()
    with sealed_h5(out) as f:
        _write_split(f, source, "images", "labels", progress)
        if test is not None:
            if (test.resolution, test.channels) != (source.resolution, source.channels):
                raise PipelineError(f"{test.describe()}: test images are {test.resolution}px with "
                                    f"{test.channels} channel(s), training images {source.resolution}px "
                                    f"with {source.channels}; the test split must be preprocessed alike.")
            _write_split(f, test, TEST_IMAGES, TEST_LABELS, progress)
            write_attrs(f[TEST_IMAGES], {"count": test.count, "source": str(test.path.resolve()),
                                         "source_kind": test.kind, "preprocessing": test.preprocessing,
                                         "checksums": json.dumps(test.checksums(), sort_keys=True)})

        attrs = {
            "dataset": source.dataset,
            "source_kind": source.kind,
            "source_path": str(source.path.resolve()),
            "preprocessing": source.preprocessing,
            "resolution": source.resolution,
            "channels": source.channels,
            "count": source.count,
            "test_count": 0 if test is None else test.count,
            "source_checksums": json.dumps(source.checksums(), sort_keys=True),
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        if source.label_names is not None:
            attrs["label_names"] = json.dumps(source.label_names)
        # str subclasses (torch's TorchVersion) would be stored as numpy arrays: make them str.
        write_attrs(f, {key: str(value) if isinstance(value, str) else value
                        for key, value in {**extra_attrs, **attrs}.items()})


def _write_split(f: h5py.File, source: ImageSource, images_name: str, labels_name: str,
                 progress: bool) -> None:
    """Write every image (and label) of `source` into datasets `images_name` / `labels_name`."""
    shape = (source.resolution, source.resolution, source.channels)
    images = f.create_dataset(images_name, shape=(source.count, *shape), dtype=np.uint8,
                              chunks=(min(chunk_images(shape), source.count), *shape), compression="gzip",
                              compression_opts=4)
    labels = (f.create_dataset(labels_name, shape=(source.count,), dtype=np.int64)
              if source.label_names is not None else None)

    written = 0
    bar = Progress(logger, f"prepare {source.dataset} {images_name}", source.count, "images",
                   bar=progress)
    with bar, contextlib.closing(source.blocks()) as blocks:
        for block in blocks:
            n = len(block.images)
            if block.images.shape[1:] != shape or written + n > source.count:
                raise PipelineError(f"{source.describe()}: reader produced images of shape "
                                    f"{block.images.shape[1:]} at index {written}, expected "
                                    f"{shape} and {source.count} images in all.")
            images[written:written + n] = block.images
            if labels is not None:
                labels[written:written + n] = block.labels
            written += n
            bar.update(n)
    if written != source.count:
        raise PipelineError(f"{source.describe()} yielded {written:,} images, expected "
                            f"{source.count:,}: the source is truncated.")


def open_image_set(path: str | Path) -> h5py.File:
    """Open a prepared data.h5 for reading, checking that it holds uint8 (N, H, W, C) images."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; run `python -m pipeline prepare --dataset "
                            f"<name>` first.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PipelineError(f"{path} is not a readable HDF5 file ({err}); delete it and prepare "
                            f"the dataset again.") from None
    images = f.get("images")
    if not isinstance(images, h5py.Dataset) or images.dtype != np.uint8 or images.ndim != 4:
        f.close()
        raise PipelineError(f"{path} holds no uint8 (N, H, W, C) 'images' dataset; it was not "
                            f"written by `python -m pipeline prepare`.")
    try:  # once per file and process: one sequential read of every dataset
        verify_h5(f, path, "delete it and rerun `python -m pipeline prepare` for its dataset")
        check_consistent(f, path)
    except PipelineError:
        f.close()
        raise
    return f


def check_consistent(f: h5py.File, path: str | Path) -> None:
    """The datasets agree with each other and with the file's own attributes (those present):
    (N, H, W, C) layout, resolution, channels, count, test_count and one label per image.

    A sealed file can still disagree with itself when it was written by another tool (or an
    older prepare): training would then build a model of the wrong width without a word.
    :raises PipelineError: naming the mismatch, the values found and the fix.
    """
    fix = "delete it and rerun `python -m pipeline prepare` for its dataset"
    attrs = {key: f.attrs[key] for key in ("resolution", "channels", "count", "test_count") if key in f.attrs}
    for images_name, labels_name, count_key in (("images", "labels", "count"),
                                                 (TEST_IMAGES, TEST_LABELS, "test_count")):
        if images_name not in f:
            if labels_name in f:
                raise PipelineError(f"{path} holds '{labels_name}' without '{images_name}'; {fix}.")
            if attrs.get(count_key, 0) and images_name == TEST_IMAGES:
                raise PipelineError(f"{path} says {count_key}={int(attrs[count_key])} but holds no "
                                    f"'{images_name}'; {fix}.")
            continue
        images = f[images_name]
        shape = tuple(int(n) for n in images.shape)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise PipelineError(f"{path}: '{images_name}' is {images.dtype} of shape {shape}, not uint8 "
                                f"(N, H, W, C); {fix}.")
        n, height, width, channels = shape
        if channels not in (1, 3) and height in (1, 3) and width == channels:
            raise PipelineError(f"{path}: '{images_name}' has shape {shape}, which is channels-first "
                                f"(N, C, H, W); data.h5 holds (N, H, W, C) images; {fix}.")
        if height != width:
            raise PipelineError(f"{path}: '{images_name}' are {height}x{width} (shape {shape}); the "
                                f"pipeline needs square images; {fix}.")
        expected = {"channels": channels, "resolution": height, count_key: n}
        for key, found in expected.items():
            if key in attrs and int(attrs[key]) != found:
                raise PipelineError(f"{path}: '{images_name}' has shape {shape} ({key} {found}) but the "
                                    f"file's attribute says {key}={int(attrs[key])}; {fix}.")
        if labels_name in f and tuple(f[labels_name].shape) != (n,):
            raise PipelineError(f"{path}: '{labels_name}' has shape {tuple(f[labels_name].shape)} for "
                                f"{n} images in '{images_name}'; one label per image is needed; {fix}.")


def read_rows(dataset: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """dataset[indices] for any int indices (unsorted, repeated), read chunk-friendly.

    Few rows are read one by one (h5py's point selection is slower); many rows by scanning the
    dataset in slabs of whole chunks, which costs one sequential pass at most.
    """
    indices = np.asarray(indices, dtype=np.int64)
    total = dataset.shape[0]
    if indices.size and (indices.min() < 0 or indices.max() >= total):
        raise IndexError(f"indices outside [0, {total}) requested")
    unique, inverse = np.unique(indices, return_inverse=True)
    rows = np.empty((len(unique), *dataset.shape[1:]), dtype=dataset.dtype)
    if len(unique) * SPARSE_FRACTION <= total:
        for i, index in enumerate(unique.tolist()):
            rows[i] = dataset[index]
    else:
        chunk = dataset.chunks[0] if dataset.chunks else 1
        row_bytes = max(1, rows[0].nbytes if len(rows) else 1)
        slab = max(chunk, (SLAB_BYTES // row_bytes) // chunk * chunk)
        for start in range(0, total, slab):
            lo, hi = np.searchsorted(unique, [start, start + slab])
            if hi > lo:
                rows[lo:hi] = dataset[start:min(start + slab, total)][unique[lo:hi] - start]
    return rows[inverse.reshape(-1)]


def read_images(path: str | Path, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Images of a prepared set, for metric stages: (n, H, W, C) uint8 in the order of `indices`
    (all N images when None)."""
    with open_image_set(path) as f:
        return f["images"][...] if indices is None else read_rows(f["images"], np.asarray(indices))


def read_labels(path: str | Path, indices: np.ndarray | list[int] | None = None) -> np.ndarray | None:
    """Labels (n,) int64 in the order of `indices` (all when None), or None if the set has none."""
    with open_image_set(path) as f:
        if "labels" not in f:
            return None
        return f["labels"][...] if indices is None else read_rows(f["labels"], np.asarray(indices))


def read_info(path: str | Path) -> dict[str, Any]:
    """The attributes of a prepared set, JSON fields decoded, plus its image shape (N, H, W, C)."""
    with open_image_set(path) as f:
        info = {key: (value.item() if hasattr(value, "item") else value) for key, value in f.attrs.items()}
        info["shape"] = tuple(f["images"].shape)
    for key in ("source_checksums", "label_names"):
        if isinstance(info.get(key), str):
            info[key] = json.loads(info[key])
    return info
