"""Which reader serves a dataset, and where its raw data is found when none is configured.

Each dataset accepts a few source kinds (see DATASETS). With `source: null` the default places
are tried in order; when nothing is found the error says what was looked for, where, and how to
obtain the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.base import ImageSource
from pipeline.data.cifar import (CIFAR10_FOLDER, CIFAR10_TARBALL, CIFAR10_TARBALL_MD5,
                                 CIFAR10_URL, CifarSource)
from pipeline.io.download import DownloadFailed, download
from pipeline.data.idx import (OFFICIAL_MD5, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
                               IdxSource, find_idx_file)
from pipeline.data.image_folder import ImageFolderSource
from pipeline.data.lmdb_images import LmdbSource, is_lmdb
from pipeline.errors import PipelineError

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: channels, the official training-set size (None: whatever the source
    holds) and, for the error message, the accepted sources and where to get them."""

    channels: int
    expected_count: int | None
    accepted: str
    obtain: str
    test_count: int | None = None  # size of the official test split, when there is one


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        channels=3, expected_count=50_000,
        accepted=f"the tarball {CIFAR10_TARBALL}, its extracted {CIFAR10_FOLDER}/ folder, or a "
                 f"folder of 32x32 images (class subfolders give labels)",
        obtain=f"download {CIFAR10_URL} (md5 {CIFAR10_TARBALL_MD5}) when online"),
    "lsun_tower": DatasetSpec(
        channels=3, expected_count=None,
        accepted="the official LMDB folder tower_train_lmdb/ (holding data.mdb) or a folder of images",
        obtain="download http://dl.yf.io/lsun/scenes/tower_train_lmdb.zip (or run "
               "`python download.py -c tower` from https://github.com/fyu/lsun) and unzip it"),
    "ffhq": DatasetSpec(
        channels=3, expected_count=70_000,
        accepted="a folder of the official PNGs (thumbnails128x128/ or images1024x1024/)",
        obtain="download thumbnails128x128 or images1024x1024 as described at "
               "https://github.com/NVlabs/ffhq-dataset"),
    "fashion_mnist": DatasetSpec(
        channels=1, expected_count=60_000, test_count=10_000,
        accepted=f"a folder holding {TRAIN_IMAGES}[.gz] and {TRAIN_LABELS}[.gz]",
        obtain=f"`apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}` (its files in "
               f"{DEBIAN_FASHION_MNIST} are found without further settings), or download "
               f"{FASHION_MNIST_URL}{TRAIN_IMAGES}.gz and {FASHION_MNIST_URL}{TRAIN_LABELS}.gz"),
}


def open_source(dataset: str, source: str | Path | None, *, download_allowed: bool,
                downloads_dir: Path, resolution: int, max_images: int | None = None,
                workers: int = 1) -> ImageSource:
    """Open and validate the raw data of `dataset` with the official size and checksums.

    :param source: configured path (a file or folder, depending on the dataset), or None for
                   the default places: earlier downloads in `downloads_dir`, Debian's files
                   (fashion_mnist), then a download if `download_allowed`.
    :param downloads_dir: where downloads are kept (downloads are md5-checked and atomic).
    :raises PipelineError: missing, unreadable, corrupt or truncated source.
    """
    if dataset not in DATASETS:
        raise PipelineError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}.")
    spec = DATASETS[dataset]
    if source is None:
        path = _default_source(dataset, spec, download_allowed, Path(downloads_dir))
        where = f"the default source {path}"
    else:
        path = Path(source).expanduser()
        where = f"datasets.{dataset}.source (or --source) = {path}"
        if not path.exists():
            raise PipelineError(f"{dataset}: {where} does not exist. Expected {spec.accepted}; "
                                f"to obtain it, {spec.obtain}.")

    common = dict(resolution=resolution, expected_count=spec.expected_count, max_images=max_images)
    if dataset == "cifar10":
        if path.is_file() or (path / "data_batch_1").is_file() or (path / CIFAR10_FOLDER).is_dir():
            return CifarSource(dataset, path, **common)
        return ImageFolderSource(dataset, path, channels=3, class_folders=True, workers=workers, **common)
    if dataset == "fashion_mnist":
        if not path.is_dir():
            raise PipelineError(f"{dataset}: {where} is not a folder; expected {spec.accepted}.")
        return IdxSource(dataset, path, test_expected_count=spec.test_count, **common)
    if is_lmdb(path) and dataset == "lsun_tower":
        return LmdbSource(dataset, path, channels=spec.channels, workers=workers, **common)
    if not path.is_dir():
        raise PipelineError(f"{dataset}: {where} is not a folder; expected {spec.accepted}.")
    return ImageFolderSource(dataset, path, channels=spec.channels, workers=workers, **common)


def _default_source(dataset: str, spec: DatasetSpec, download_allowed: bool, downloads_dir: Path) -> Path:
    """The first default place that holds the data, downloading into `downloads_dir` if allowed."""
    looked: list[str] = []
    failure = (None if download_allowed else
               f"Downloading is off (datasets.{dataset}.download: false, or --no-download)")

    if dataset == "fashion_mnist":
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
    elif dataset == "cifar10":
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
        f"{spec.obtain}. A copy anywhere else is used when datasets.{dataset}.source in "
        f"config.yaml (or --source) points at {spec.accepted}.")
