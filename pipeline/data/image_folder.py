"""A folder of image files (searched recursively), e.g. FFHQ's PNGs or an exported CIFAR-10.

Files are taken in the order of their relative paths, so the same folder always gives the same
array. Each image is converted to RGB (or L), then resized and centre-cropped the way
guided-diffusion does (see resize.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.base import (ImageBlock, ImageSource, RecordDigest, decode_blocks,
                                select_count)
from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".tif", ".tiff")
# PIL modes of one channel; every other mode (RGB, RGBA, P, CMYK, ...) is stored as RGB.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` sorted by relative path; hidden files (e.g. macOS '._x.png') skipped."""
    files = [p for p in folder.rglob("*")
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderSource(ImageSource):
    """Images from the files of a folder.

    :param class_folders: when every image lies in a first-level subfolder, label it with the
                          index of its subfolder's name in sorted order (CIFAR-10 exported as
                          class folders gets the official label numbers this way, as its class
                          names sort in label order). FFHQ's numbered subfolders are not classes.
    :param workers: decoding processes.
    :param uniform_mode: read every file's header first and refuse a folder that mixes grayscale
                         and colour images, or whose images have another channel count than
                         `channels` (a user's folder, where a silent conversion hides a mistake).
    """

    kind = "image-folder"

    def __init__(self, dataset: str, folder: Path, resolution: int, channels: int,
                 expected_count: int | None, max_images: int | None = None,
                 class_folders: bool = False, workers: int = 1, uniform_mode: bool = False) -> None:
        folder = Path(folder)
        files = list_images(folder)
        if not files:
            raise PipelineError(f"{dataset}: {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}), "
                                f"neither directly nor in subfolders; put the images there or point "
                                f"datasets.{dataset}.source at the folder that holds them.")
        count = select_count(f"image folder {folder}", len(files), expected_count, max_images)
        self.files = files[:count]
        if uniform_mode:
            check_modes(dataset, folder, self.files, channels)
        self.workers = workers
        self._digest = RecordDigest()

        label_names = None
        relative = [p.relative_to(folder).parts for p in self.files]
        if class_folders and all(len(parts) == 2 for parts in relative):
            label_names = sorted({parts[0] for parts in relative})
            index = {name: i for i, name in enumerate(label_names)}
            self._labels = np.array([index[parts[0]] for parts in relative], dtype=np.int64)
        self._mode = "L" if channels == 1 else "RGB"
        preprocessing = (f"first {count} image files by relative path, converted to {self._mode}, "
                         f"resized like guided-diffusion's center_crop_arr (BOX halving while the "
                         f"short side >= 2x{resolution}, BICUBIC to {resolution}, centre crop)"
                         + ("; label = index of the sorted class folder" if label_names else ""))
        super().__init__(dataset, folder, count, resolution, channels, label_names, preprocessing)

    def _records(self) -> Iterator[tuple[str, bytes]]:
        for path in self.files:
            try:
                payload = path.read_bytes()
            except OSError as err:
                raise PipelineError(f"unreadable image {path}: {err}") from None
            self._digest.update(path.relative_to(self.path).as_posix().encode(), payload)
            yield str(path), payload

    def blocks(self) -> Iterator[ImageBlock]:
        start = 0
        for images in decode_blocks(self._records(), self.resolution, self._mode, self.workers):
            stop = start + len(images)
            labels = self._labels[start:stop] if self.label_names is not None else None
            yield ImageBlock(images, labels)
            start = stop

    def checksums(self) -> dict[str, Any]:
        return {self.path.name or str(self.path): {
            "sha256_of_records": self._digest.hexdigest(), "records": self._digest.records,
            "method": "sha256 over (relative path, file bytes) of each file used, in sorted "
                      "path order, each part preceded by its 8-byte little-endian length"}}


def check_modes(dataset: str, folder: Path, files: list[Path], channels: int) -> None:
    """Refuse grayscale and colour images side by side, or images of another channel count.

    Only headers are read. A file PIL cannot open is left to the decoder, whose error names it.
    """
    examples: dict[int, Path] = {}
    counts: dict[int, int] = {}
    for path in files:
        try:
            with Image.open(path) as image:
                mode = image.mode
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
            continue
        found = 1 if mode in GRAY_MODES else 3
        examples.setdefault(found, path)
        counts[found] = counts.get(found, 0) + 1
    name = {1: "grayscale", 3: "colour"}
    where = lambda c: examples[c].relative_to(folder).as_posix()  # noqa: E731
    if len(counts) > 1:
        raise PipelineError(
            f"{dataset}: {folder} mixes image modes: {counts[1]} grayscale (e.g. {where(1)}) and "
            f"{counts[3]} colour (e.g. {where(3)}); convert them all to one mode (e.g. PIL "
            f"image.convert('RGB')) so datasets.{dataset}.channels describes every image.")
    if counts and channels not in counts:
        found = next(iter(counts))
        raise PipelineError(
            f"{dataset}: the images in {folder} are {name[found]} ({found} channel(s), e.g. {where(found)}) "
            f"but datasets.{dataset}.channels is {channels}; set channels: {found} or convert the images.")
