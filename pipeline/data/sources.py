"""Which reader serves a dataset, and where its raw data is found when none is configured.

A dataset is an entry of config `datasets:` (config.yaml, or an overlay for a dataset of your
own) whose `kind` names one of the readers in SOURCE_KINDS, with its `channels`, `count` (the
official training-set size, null = whatever the source holds) and `source`. With `source: null`
the default places of the kind are tried in order; when nothing is found the error says what was
looked for, where, and how to obtain the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.arrays import LAYOUT, open_array_file
from pipeline.data.base import ImageSource
from pipeline.data.cifar import (CIFAR10_FOLDER, CIFAR10_TARBALL, CIFAR10_TARBALL_MD5,
                                 CIFAR10_URL, CifarSource)
from pipeline.io.download import DownloadFailed, download
from pipeline.data.idx import (OFFICIAL_MD5, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
                               IdxSource, find_idx_file)
from pipeline.data.image_folder import IMAGE_SUFFIXES, ImageFolderSource
from pipeline.data.lmdb_images import LmdbSource, is_lmdb
from pipeline.errors import PipelineError

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


@dataclass(frozen=True)
class SourceKind:
    """A reader, for the error messages: the sources it accepts and, when it has default
    places, how to obtain them (a dataset's own `obtain` text replaces this)."""

    accepted: str
    obtain: str | None = None


# The values of datasets.<name>.kind (the schema lists the same names).
SOURCE_KINDS: dict[str, SourceKind] = {
    "cifar10_python": SourceKind(
        accepted=f"the tarball {CIFAR10_TARBALL}, its extracted {CIFAR10_FOLDER}/ folder, or a "
                 f"folder of 32x32 images (class subfolders give labels)",
        obtain=f"download {CIFAR10_URL} (md5 {CIFAR10_TARBALL_MD5}) when online"),
    "fashion_mnist_idx": SourceKind(
        accepted=f"a folder holding {TRAIN_IMAGES}[.gz] and {TRAIN_LABELS}[.gz]",
        obtain=f"`apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}` (its files in "
               f"{DEBIAN_FASHION_MNIST} are found without further settings), or download "
               f"{FASHION_MNIST_URL}{TRAIN_IMAGES}.gz and {FASHION_MNIST_URL}{TRAIN_LABELS}.gz"),
    "lsun_lmdb": SourceKind(
        accepted="an LMDB folder holding data.mdb (e.g. LSUN's tower_train_lmdb/) or a folder of images"),
    "image_folder": SourceKind(
        accepted=f"a folder of images ({', '.join(IMAGE_SUFFIXES)}), flat or in one subfolder per "
                 f"class, of any size"),
    "array": SourceKind(accepted=f"an .npz or HDF5 (.h5, .hdf5) file holding {LAYOUT}"),
}


def dataset_entry(dataset: str, entry: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config entry datasets.<dataset> (from the repository's config.yaml when not given),
    with its kind checked."""
    if entry is None:
        from pipeline.config import load_config, section

        entry = section(load_config(), "datasets", dataset)
    entry = dict(entry)
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise PipelineError(f"datasets.{dataset}.kind = {kind!r}; set it to one of "
                            f"{', '.join(SOURCE_KINDS)}.")
    if entry.get("channels") not in (1, 3):
        raise PipelineError(f"datasets.{dataset}.channels = {entry.get('channels')!r}; set it to 1 "
                            f"(grayscale) or 3 (RGB).")
    return entry


def open_source(dataset: str, source: str | Path | None, *, download_allowed: bool,
                downloads_dir: Path, resolution: int, max_images: int | None = None,
                workers: int = 1, entry: Mapping[str, Any] | None = None) -> ImageSource:
    """Open and validate the raw data of `dataset` with the official size and checksums.

    :param source: configured path (a file or folder, depending on the kind), or None for the
                   default places: earlier downloads in `downloads_dir`, Debian's files
                   (fashion_mnist_idx), then a download if `download_allowed`.
    :param downloads_dir: where downloads are kept (downloads are md5-checked and atomic).
    :param entry: the config entry datasets.<dataset> (kind, channels, count, ...); None reads
                  it from the repository's config.yaml.
    :raises PipelineError: missing, unreadable, corrupt or truncated source.
    """
    entry = dataset_entry(dataset, entry)
    kind, channels = entry["kind"], entry["channels"]
    spec = SOURCE_KINDS[kind]
    obtain = (entry.get("obtain") or spec.obtain
              or f"put {spec.accepted} anywhere and set datasets.{dataset}.source to its path")
    if source is None:
        path = _default_source(dataset, kind, obtain, download_allowed, Path(downloads_dir))
        where = f"the default source {path}"
    else:
        path = Path(source).expanduser()
        where = f"datasets.{dataset}.source (or --source) = {path}"
        if not path.exists():
            raise PipelineError(f"{dataset}: {where} does not exist. Expected {spec.accepted}; "
                                f"to obtain it, {obtain}.")

    common = dict(resolution=resolution, expected_count=entry.get("count"), max_images=max_images)
    if kind == "array":
        if not path.is_file():
            raise PipelineError(f"{dataset}: {where} is not a file; expected {spec.accepted}.")
        return open_array_file(dataset, path, channels=channels, **common)
    if kind == "cifar10_python":
        if path.is_file() or (path / "data_batch_1").is_file() or (path / CIFAR10_FOLDER).is_dir():
            return CifarSource(dataset, path, **common)
        return ImageFolderSource(dataset, path, channels=channels, class_folders=True, workers=workers,
                                 **common)
    if not path.is_dir():
        raise PipelineError(f"{dataset}: {where} is not a folder; expected {spec.accepted}.")
    if kind == "fashion_mnist_idx":
        return IdxSource(dataset, path, test_expected_count=entry.get("test_count"), **common)
    if kind == "lsun_lmdb" and is_lmdb(path):
        return LmdbSource(dataset, path, channels=channels, workers=workers, **common)
    # A user's folder (image_folder) must be uniform; LSUN's exported folders are converted as before.
    user_folder = kind == "image_folder"
    return ImageFolderSource(dataset, path, channels=channels, workers=workers,
                             class_folders=user_folder and entry.get("class_folders", True),
                             uniform_mode=user_folder, **common)


def _default_source(dataset: str, kind: str, obtain: str, download_allowed: bool,
                    downloads_dir: Path) -> Path:
    """The first default place that holds the data, downloading into `downloads_dir` if allowed."""
    looked: list[str] = []
    failure = (None if download_allowed else
               f"Downloading is off (datasets.{dataset}.download: false, or --no-download)")

    if kind == "fashion_mnist_idx":
        folder = downloads_dir / dataset
        for candidate, label in ((DEBIAN_FASHION_MNIST, f"Debian package {DEBIAN_FASHION_MNIST_PACKAGE}"),
                                 (folder, "earlier download")):
            if all(find_idx_file(candidate, stem) for stem in (TRAIN_IMAGES, TRAIN_LABELS)):
                return candidate
            looked.append(f"{candidate}/ ({label}): no {TRAIN_IMAGES}[.gz] and {TRAIN_LABELS}[.gz]")
        if download_allowed:
            try:
                # The t10k files are the calibration floor's held-out images.
                for stem in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
                    name = f"{stem}.gz"
                    download(FASHION_MNIST_URL + name, folder / name, md5=OFFICIAL_MD5[name])
                return folder
            except DownloadFailed as err:
                failure = str(err)
    elif kind == "cifar10_python":
        tarball = downloads_dir / CIFAR10_TARBALL
        if tarball.is_file():
            return tarball
        looked.append(f"{tarball} (earlier download): absent")
        if download_allowed:
            try:
                return download(CIFAR10_URL, tarball, md5=CIFAR10_TARBALL_MD5)
            except DownloadFailed as err:
                failure = str(err)
    else:
        failure = f"There is no automatic download for {dataset}"

    looked.insert(0, f"datasets.{dataset}.source: null")
    raise PipelineError(
        f"{dataset}: no source found. Looked at: {'; '.join(looked)}. {failure}. To fix: "
        f"{obtain}. A copy anywhere else is used when datasets.{dataset}.source in "
        f"config.yaml (or --source) points at {SOURCE_KINDS[kind].accepted}.")
