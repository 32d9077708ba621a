"""A dataset already stored as one array: an .npz file or an HDF5 file (.h5, .hdf5).

The file holds `images`, uint8 (N, H, W) for grayscale or (N, H, W, C) with C = 1 or 3
(channels last), and optionally `labels`, integers (N,). Images of another size than the
dataset's resolution are resized and centre-cropped the way the image readers do (resize.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.base import ArraySource, file_digests, select_count
from pipeline.data.resize import center_crop_arr
from pipeline.errors import PipelineError

NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".h5", ".hdf5")
ARRAY_SUFFIXES = NPZ_SUFFIXES + HDF5_SUFFIXES
LAYOUT = ("a uint8 array 'images' (N, H, W) or (N, H, W, C) with C = 1 or 3, channels last, and "
          "optionally integer 'labels' (N,)")


def _read_arrays(path: Path, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` and `labels` (or None) of an .npz or HDF5 file; `key` names the config entry."""
    try:
        if path.suffix.lower() in NPZ_SUFFIXES:
            with np.load(path, allow_pickle=False) as arrays:
                names = list(arrays.files)
                images = arrays["images"] if "images" in names else None
                labels = arrays["labels"] if "labels" in names else None
        else:
            import h5py

            with h5py.File(path, "r") as f:
                names = list(f.keys())
                images = f["images"][...] if isinstance(f.get("images"), h5py.Dataset) else None
                labels = f["labels"][...] if isinstance(f.get("labels"), h5py.Dataset) else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PipelineError(f"{key}: {path} is not a readable {path.suffix} file ({err}); expected "
                            f"{LAYOUT}.") from None
    if images is None:
        raise PipelineError(f"{key}: {path} has no array 'images' (it holds: {', '.join(names) or 'nothing'}); "
                            f"store the images under that name: {LAYOUT}.")
    return images, labels


def open_array_file(dataset: str, path: Path, resolution: int, channels: int,
                    expected_count: int | None, max_images: int | None = None) -> ArraySource:
    """Read and check an array file, resize its images to `resolution` and hold them in memory.

    :raises PipelineError: unknown suffix, missing 'images', wrong dtype or shape, channel count
                           other than `channels`, labels of another length.
    """
    key = f"datasets.{dataset}.source"
    path = Path(path)
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise PipelineError(f"{key} = {path}: an array dataset is an .npz or HDF5 file "
                            f"({', '.join(ARRAY_SUFFIXES)}); save {LAYOUT} in one.")
    images, labels = _read_arrays(path, key)

    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise PipelineError(f"{key}: 'images' in {path} has shape {images.shape}; expected (N, H, W) or "
                            f"(N, H, W, C) with C = 1 or 3 (channels last: move a channel axis with "
                            f"numpy.moveaxis(images, 1, -1)).")
    if images.dtype != np.uint8:
        raise PipelineError(f"{key}: 'images' in {path} is {images.dtype}; store uint8 pixels 0..255 "
                            f"(e.g. (x * 255).round().astype(numpy.uint8) for floats in [0, 1]).")
    if images.shape[3] != channels:
        raise PipelineError(f"{key}: the images in {path} have {images.shape[3]} channel(s) but "
                            f"datasets.{dataset}.channels is {channels}; set channels: {images.shape[3]} "
                            f"or convert the images.")
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
                               or (labels.size and labels.min() < 0)):
        raise PipelineError(f"{key}: 'labels' in {path} has shape {labels.shape} and dtype {labels.dtype}; "
                            f"expected class indices >= 0 of shape ({len(images)},), one per image, or no "
                            f"'labels'.")

    count = select_count(f"array file {path}", len(images), expected_count, max_images)
    images = images[:count]
    height, width = images.shape[1:3]
    resized = (height, width) != (resolution, resolution)
    if resized:
        mode = "L" if channels == 1 else "RGB"
        images = np.stack([center_crop_arr(Image.fromarray(image[..., 0] if channels == 1 else image, mode),
                                           resolution).reshape(resolution, resolution, channels)
                           for image in images])
    labels = None if labels is None else labels[:count].astype(np.int64)
    preprocessing = (f"first {count} images of the array 'images'"
                     + (f", {height}x{width} resized like guided-diffusion's center_crop_arr (BOX halving "
                        f"while the short side >= 2x{resolution}, BICUBIC to {resolution}, centre crop)"
                        if resized else ", stored as they are"))
    checksums: dict[str, Any] = {path.name: file_digests(path)}
    label_names = None if labels is None else [str(i) for i in range(int(labels.max()) + 1)]
    return ArraySource(dataset, path, "array", np.ascontiguousarray(images), labels, label_names,
                       preprocessing, checksums)
