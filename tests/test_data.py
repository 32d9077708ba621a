"""Data stage: every source kind on a small fixture in its real on-disk format, the errors a user
sees for missing or corrupt sources, atomic writes, and the training loader's determinism."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data.base as data_base
import pipeline.data.sources as sources
from pipeline.io.integrity import seal_h5
from pipeline.cli import main as cli_main
from pipeline.data.cifar import CIFAR10_TARBALL_MD5, CIFAR10_URL, CifarSource
from pipeline.io.download import download
from pipeline.data.hdf5 import read_images, read_info, read_labels, write_image_set
from pipeline.data.idx import IdxSource
from pipeline.data.image_folder import ImageFolderSource
from pipeline.data.lmdb_images import LmdbSource
from pipeline.data.loader import TrainingBatches
from pipeline.data.resize import center_crop_arr
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def pattern_images(n: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, C) uint8 images that differ from each other and from their mirror images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 whose port nobody listens on: refused at once, no traffic."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def write_and_read(source, out: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    write_image_set(out, source, {"stage": "test"}, progress=False)
    return read_images(out), read_labels(out), read_info(out)


# ------------------------------------------------------------------------------------------
# Resizing (guided-diffusion's center_crop_arr behaviour, checked against independent math).

def test_center_crop_box_halving_is_the_2x2_mean():
    image = pattern_images(1, 128, 128, 3)[0]
    out = center_crop_arr(Image.fromarray(image), 64)
    mean = image.astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out - mean).max() <= 1  # PIL's fixed-point BOX filter rounds within 1


def test_center_crop_keeps_the_centre_of_a_wide_image():
    # Column x of the 300x200 source holds the value x * 255 / 299 (a horizontal ramp).
    ramp = np.round(np.arange(300) * 255 / 299).astype(np.uint8)
    image = Image.fromarray(np.tile(ramp, (200, 1)), mode="L")
    out = center_crop_arr(image, 64)
    # BOX 300x200 -> 150x100; BICUBIC to 96x64; crop columns 16..79 of 96 = source x 50..249.
    assert out.shape == (64, 64)
    expected = (np.arange(16, 80) + 0.5) * (300 / 96) - 0.5
    assert np.abs(out[32].astype(float) - expected * 255 / 299).max() < 2.5
    assert (out == out[0]).all()  # rows unchanged by a horizontal ramp


# ------------------------------------------------------------------------------------------
# CIFAR-10: the python-version tarball of pickled batches, and its extracted folder.

def make_cifar_batches(folder: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, pickled like the
    official files (bytes keys, protocol 2). Returns the training images (HWC) and labels."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    images = pattern_images(5 * per_batch, 32, 32, 3, seed=1)
    labels = np.arange(5 * per_batch) % 10
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        planar = images[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        batch = {b"batch_label": f"training batch {b + 1} of 5".encode(), b"labels": labels[sl].tolist(),
                 b"data": planar, b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        (batches / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": planar, b"labels": [0] * per_batch}, protocol=2))
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return images, labels


def make_cifar_tarball(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = make_cifar_batches(tmp_path / "extract")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "extract" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tarball, images, labels


def test_cifar_tarball(tmp_path):
    tarball, images, labels = make_cifar_tarball(tmp_path)
    source = CifarSource("cifar10", tarball, expected_count=30, official_checksums=False)
    got, got_labels, info = write_and_read(source, tmp_path / "data.h5")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert info["count"] == 30 and info["resolution"] == 32 and info["channels"] == 3
    assert info["source_kind"] == "cifar10-tarball"
    with h5py.File(tmp_path / "data.h5") as f:  # the fixture's test_batch repeats data_batch_5
        np.testing.assert_array_equal(f["test_images"][...], images[24:])
        assert f.attrs["test_count"] == 6 and f["test_images"].attrs["source_kind"] == "cifar10-tarball-test"
    sums = info["source_checksums"]["cifar-10-python.tar.gz"]
    assert sums["sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert info["label_names"][0] == "airplane"


def test_cifar_extracted_folder_and_max_images(tmp_path):
    images, labels = make_cifar_batches(tmp_path)
    source = CifarSource("cifar10", tmp_path, expected_count=30, max_images=8, official_checksums=False)
    got, got_labels, info = write_and_read(source, tmp_path / "data.h5")
    np.testing.assert_array_equal(got, images[:8])
    np.testing.assert_array_equal(got_labels, labels[:8])
    # test_batch is read too: it becomes the held-out "test_images", whole (max_images caps training only).
    assert info["source_kind"] == "cifar10-batches" and set(info["source_checksums"]) == {
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"}
    assert info["test_count"] == 6
    with pytest.raises(PipelineError, match="data_batch_1 has md5 .* not the official c99cafc"):
        CifarSource("cifar10", tmp_path, max_images=8)


def test_cifar_wrong_count_is_named_truncated(tmp_path):
    tarball, _, _ = make_cifar_tarball(tmp_path)
    with pytest.raises(PipelineError, match=r"holds 30 images but the official training set has 50,000.*truncated"):
        CifarSource("cifar10", tarball, official_checksums=False)


def test_cifar_md5_mismatch(tmp_path):
    tarball, _, _ = make_cifar_tarball(tmp_path)
    with pytest.raises(PipelineError, match=f"not the official {CIFAR10_TARBALL_MD5}.*corrupt or truncated"):
        CifarSource("cifar10", tarball, max_images=10)


def test_cifar_truncated_tarball(tmp_path):
    tarball, _, _ = make_cifar_tarball(tmp_path)
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        CifarSource("cifar10", tarball, expected_count=30, official_checksums=False)


def test_cifar_batch_that_is_not_a_pickled_array_is_refused(tmp_path):
    make_cifar_batches(tmp_path)
    # A pickle that would call os.system when loaded with plain pickle.
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(PipelineError, match="data_batch_3 is corrupt.*refusing to load os.system"):
        CifarSource("cifar10", tmp_path, expected_count=30, official_checksums=False)


def test_cifar_folder_of_class_images(tmp_path):
    images = pattern_images(6, 32, 32, 3, seed=2)
    for i, image in enumerate(images):
        folder = tmp_path / "train" / ("cat" if i % 2 else "airplane")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    source = ImageFolderSource("cifar10", tmp_path / "train", 32, 3, expected_count=6, class_folders=True)
    got, got_labels, info = write_and_read(source, tmp_path / "data.h5")
    # Sorted by relative path: airplane/0000, 0002, 0004, then cat/0001, 0003, 0005.
    np.testing.assert_array_equal(got, images[[0, 2, 4, 1, 3, 5]])
    np.testing.assert_array_equal(got_labels, [0, 0, 0, 1, 1, 1])
    assert info["label_names"] == ["airplane", "cat"]


# ------------------------------------------------------------------------------------------
# LSUN: an LMDB mapping image ids to encoded WebP/JPEG bytes.

def make_lmdb(path: Path, count: int = 12, bad_key: bytes | None = None) -> dict[bytes, np.ndarray]:
    """LMDB of losslessly encoded images of assorted sizes (a few JPEG), keys inserted shuffled.
    Returns key -> the expected 64x64 crop."""
    rng = np.random.default_rng(3)
    expected = {}
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in rng.permutation(count):
            key = hashlib.sha1(str(i).encode()).hexdigest().encode()
            width, height = (96 + 8 * (i % 5), 80 + 4 * (i % 3))
            image = Image.fromarray(pattern_images(1, height, width, 3, seed=int(i))[0])
            buffer = io.BytesIO()
            if i % 4 == 3:
                image.save(buffer, format="JPEG", quality=90)
            else:
                image.save(buffer, format="WEBP", lossless=True)
            payload = b"not an image at all" if key == bad_key else buffer.getvalue()
            txn.put(key, payload)
            decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
            expected[key] = center_crop_arr(decoded, 64)
    env.close()
    return dict(sorted(expected.items()))


def test_lmdb_in_key_order(tmp_path):
    expected = make_lmdb(tmp_path / "tower_train_lmdb")
    source = LmdbSource("lsun_tower", tmp_path / "tower_train_lmdb", 64, 3, expected_count=None)
    got, labels, info = write_and_read(source, tmp_path / "data.h5")
    assert got.shape == (12, 64, 64, 3) and labels is None
    np.testing.assert_array_equal(got, np.stack(list(expected.values())))
    assert info["source_checksums"]["tower_train_lmdb"]["records"] == 12


def test_lmdb_max_images_caps_and_workers_agree(tmp_path):
    expected = make_lmdb(tmp_path / "db")
    capped = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None, max_images=5)
    assert capped.count == 5
    beyond = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None, max_images=1000)
    assert beyond.count == 12
    pooled = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None, max_images=5, workers=2)
    got, _, _ = write_and_read(pooled, tmp_path / "data.h5")
    np.testing.assert_array_equal(got, np.stack(list(expected.values())[:5]))


def test_lmdb_undecodable_value_is_named(tmp_path):
    bad = hashlib.sha1(b"7").hexdigest().encode()
    make_lmdb(tmp_path / "db", bad_key=bad)
    source = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None)
    with pytest.raises(PipelineError, match=f"unreadable image .*record '{bad.decode()}'"):
        write_image_set(tmp_path / "out" / "data.h5", source, {}, progress=False)


def test_lmdb_via_open_source_and_not_an_lmdb(tmp_path):
    make_lmdb(tmp_path / "db")
    source = sources.open_source("lsun_tower", tmp_path / "db", download_allowed=False,
                                 downloads_dir=tmp_path / "dl", resolution=64)
    assert isinstance(source, LmdbSource) and source.count == 12
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "data.mdb").write_bytes(b"\0" * 100)
    with pytest.raises(PipelineError, match="not a readable LMDB"):
        sources.open_source("lsun_tower", tmp_path / "broken", download_allowed=False,
                            downloads_dir=tmp_path / "dl", resolution=64)


# ------------------------------------------------------------------------------------------
# FFHQ-style folder of PNGs (nested numbered folders, 128x128 thumbnails -> 64x64).

def make_png_folder(root: Path, count: int = 20, size: int = 128) -> np.ndarray:
    images = pattern_images(count, size, size, 3, seed=4)
    for i, image in enumerate(images):
        folder = root / f"{(i // 8) * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return images


def test_png_folder_ffhq_style(tmp_path):
    images = make_png_folder(tmp_path / "thumbnails128x128")
    source = ImageFolderSource("ffhq", tmp_path / "thumbnails128x128", 64, 3, expected_count=20)
    got, labels, info = write_and_read(source, tmp_path / "data.h5")
    means = images.astype(np.float64).reshape(20, 64, 2, 64, 2, 3).mean(axis=(2, 4))
    assert got.shape == (20, 64, 64, 3) and labels is None
    assert np.abs(got - means).max() <= 1
    assert info["source_checksums"]["thumbnails128x128"]["records"] == 20


def test_png_folder_wrong_count_and_unreadable_image(tmp_path):
    make_png_folder(tmp_path / "ffhq", count=10)
    with pytest.raises(PipelineError, match=r"holds 10 images but the official training set has 70,000.*truncated"):
        sources.open_source("ffhq", tmp_path / "ffhq", download_allowed=False,
                            downloads_dir=tmp_path / "dl", resolution=64)
    (tmp_path / "ffhq" / "01000" / "00009.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = sources.open_source("ffhq", tmp_path / "ffhq", download_allowed=False,
                                 downloads_dir=tmp_path / "dl", resolution=64, max_images=10)
    with pytest.raises(PipelineError, match=r"unreadable image .*01000/00009\.png"):
        write_image_set(tmp_path / "data.h5", source, {}, progress=False)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files, plain or gzipped.

def make_idx(folder: Path, count: int = 30, compress: bool = True, split: str = "train",
             seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """IDX image and label files of `split` ("train" or "t10k") holding `count` 28x28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = pattern_images(count, 28, 28, 1, seed=seed)[..., 0]
    labels = (np.arange(count, dtype=np.uint8) + seed) % 10
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(folder / f"{split}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">4I", 0x803, count, 28, 28) + images.tobytes())
    with opener(folder / f"{split}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">2I", 0x801, count) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_padded_to_32(tmp_path, compress):
    images, labels = make_idx(tmp_path / "fm", compress=compress)
    source = IdxSource("fashion_mnist", tmp_path / "fm", 32, expected_count=30)
    got, got_labels, info = write_and_read(source, tmp_path / "data.h5")
    assert got.shape == (30, 32, 32, 1)
    np.testing.assert_array_equal(got[:, 2:30, 2:30, 0], images)
    assert not got[:, :2].any() and not got[:, 30:].any() and not got[:, :, :2].any() and not got[:, :, 30:].any()
    np.testing.assert_array_equal(got_labels, labels)
    assert info["source_kind"] == "idx"
    assert info["test_count"] == 0  # no t10k files in the folder: no test split
    with h5py.File(tmp_path / "data.h5") as f:
        assert "test_images" not in f


def test_idx_test_split_is_stored_apart_and_preprocessed_alike(tmp_path):
    """Fashion-MNIST's t10k files become "test_images"/"test_labels" (the calibration floor's
    held-out images), box-filtered like the training images; "images" stays the training set."""
    train, train_labels = make_idx(tmp_path / "fm", count=30)
    test, test_labels = make_idx(tmp_path / "fm", count=12, split="t10k", seed=8)
    source = sources.open_source("fashion_mnist", tmp_path / "fm", download_allowed=False,
                                 downloads_dir=tmp_path / "dl", resolution=16, max_images=30)
    got, got_labels, info = write_and_read(source, tmp_path / "data.h5")
    padded = lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float64)  # noqa: E731
    boxed = lambda x: np.floor(padded(x).reshape(len(x), 16, 2, 16, 2).mean(axis=(2, 4)) + 0.5)  # noqa: E731
    np.testing.assert_array_equal(got[..., 0], boxed(train))
    np.testing.assert_array_equal(got_labels, train_labels)
    assert info["count"] == 30 and info["test_count"] == 12
    with h5py.File(tmp_path / "data.h5") as f:
        assert f["test_images"].shape == (12, 16, 16, 1) and f["test_images"].dtype == np.uint8
        np.testing.assert_array_equal(f["test_images"][..., 0], boxed(test))
        np.testing.assert_array_equal(f["test_labels"][...], test_labels)
        attrs = dict(f["test_images"].attrs)
    assert attrs["count"] == 12 and attrs["source_kind"] == "idx"
    assert "t10k-images-idx3-ubyte.gz" in json.loads(attrs["checksums"])
    assert "test images" in attrs["preprocessing"] and "2x2 box means" in attrs["preprocessing"]


def test_idx_wrong_count_truncated_and_corrupt(tmp_path):
    make_idx(tmp_path / "fm")
    with pytest.raises(PipelineError, match=r"holds 30 images but the official training set has 60,000"):
        sources.open_source("fashion_mnist", tmp_path / "fm", download_allowed=False,
                            downloads_dir=tmp_path / "dl", resolution=32)
    # Cut the gzip stream short: the header still announces 30 images.
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-3000])
    source = IdxSource("fashion_mnist", tmp_path / "fm", 32, expected_count=30)
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte\.gz is (corrupt or )?truncated"):
        write_image_set(tmp_path / "data.h5", source, {}, progress=False)
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(PipelineError, match="unreadable|corrupt"):
        IdxSource("fashion_mnist", tmp_path / "fm", 32, expected_count=30)


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(),
                    reason="Debian's Fashion-MNIST files are absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_files(tmp_path):
    # The default source (no path configured) is Debian's package; read only 50 images.
    source = sources.open_source("fashion_mnist", None, download_allowed=False,
                                 downloads_dir=tmp_path / "dl", resolution=32, max_images=50)
    assert source.path == DEBIAN_DIR
    got, labels, info = write_and_read(source, tmp_path / "data.h5")
    assert got.shape == (50, 32, 32, 1) and got.max() == 255
    np.testing.assert_array_equal(labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # the published first labels
    assert info["label_names"][9] == "Ankle boot"


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(),
                    reason="Debian's Fashion-MNIST files are absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_full_prepare_through_the_cli(tmp_path):
    out = tmp_path / "data.h5"
    assert cli_main(["prepare", "--dataset", "fashion_mnist", "--no-download", "--out", str(out),
                     "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f["images"].shape == (60_000, 32, 32, 1) and f["images"].dtype == np.uint8
        assert f["labels"].shape == (60_000,) and f.attrs["count"] == 60_000
        assert f["images"].compression == "gzip"
        assert json.loads(f.attrs["source_checksums"])["train-images-idx3-ubyte.gz"]["sha256"]
        assert f["test_images"].shape == (10_000, 32, 32, 1) and f.attrs["test_count"] == 10_000
        assert f["test_labels"].shape == (10_000,)


# ------------------------------------------------------------------------------------------
# Missing sources: one clear message, no download attempt leaves anything behind.

def test_missing_fashion_mnist_offline_names_url_and_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    url = closed_port_url()
    monkeypatch.setattr(sources, "FASHION_MNIST_URL", url)
    with pytest.raises(PipelineError) as err:
        sources.open_source("fashion_mnist", None, download_allowed=True,
                            downloads_dir=tmp_path / "dl", resolution=32)
    message = str(err.value)
    assert f"Downloading {url}train-images-idx3-ubyte.gz failed" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "not-installed") in message and "datasets.fashion_mnist.source" in message
    assert not any(p.is_file() for p in (tmp_path / "dl").rglob("*"))


def test_missing_cifar10_offline_names_url(tmp_path, monkeypatch):
    url = closed_port_url() + "cifar-10-python.tar.gz"
    monkeypatch.setattr(sources, "CIFAR10_URL", url)
    with pytest.raises(PipelineError, match=f"Downloading {url} failed.*{CIFAR10_URL}"):
        sources.open_source("cifar10", None, download_allowed=True, downloads_dir=tmp_path / "dl",
                            resolution=32)
    assert not any(p.is_file() for p in (tmp_path / "dl").rglob("*"))


def test_download_is_md5_checked_and_atomic(tmp_path):
    # A server on 127.0.0.1 stands in for the official host: no traffic leaves the machine.
    served = tmp_path / "served"
    served.mkdir()
    (served / "file.gz").write_bytes(b"payload" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/file.gz"
        good = hashlib.md5(b"payload" * 1000).hexdigest()
        try:
            assert download(url, tmp_path / "dl" / "ok.gz", md5=good).read_bytes() == b"payload" * 1000
            with pytest.raises(PipelineError, match=f"has md5 {good}, not the official 0+"):
                download(url, tmp_path / "dl" / "bad.gz", md5="0" * 32)
        finally:
            server.shutdown()
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["ok.gz"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_missing_source_exits_2_without_traceback(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"results: {tmp_path / 'results'}\n")
    done = run_cli("prepare", "--dataset", "cifar10", "--no-download", "--config", str(REPO / "config.yaml"),
                   "--config", str(overlay))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cifar10: no source found") and "Traceback" not in done.stderr
    assert CIFAR10_URL in done.stderr and "Downloading is off" in done.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.h5"))


def test_cli_bad_arguments_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "data.h5"
    assert cli_main(["prepare", "--dataset", "ffhq", "--source", str(tmp_path / "nowhere"),
                     "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "does not exist" in stderr and "https://github.com/NVlabs/ffhq-dataset" in stderr
    assert cli_main(["prepare", "--dataset", "fashion_mnist", "--max-images", "0", "--out", str(out)]) == 2
    assert "max_images" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# Atomic output: a failure mid-write leaves neither data.h5 nor a temporary file, and an
# earlier complete data.h5 survives.

def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_base, "BLOCK_SIZE", 4)  # blocks of 4: the bad record is in the 3rd
    keys = sorted(hashlib.sha1(str(i).encode()).hexdigest().encode() for i in range(12))
    make_lmdb(tmp_path / "db", bad_key=keys[9])
    out_dir = tmp_path / "results" / "lsun_tower"
    source = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None)
    with pytest.raises(PipelineError, match="unreadable image"):
        write_image_set(out_dir / "data.h5", source, {}, progress=False)
    assert list(out_dir.iterdir()) == []

    earlier = out_dir / "data.h5"
    earlier.write_bytes(b"an earlier complete file")
    source = LmdbSource("lsun_tower", tmp_path / "db", 64, 3, expected_count=None)
    with pytest.raises(PipelineError):
        write_image_set(earlier, source, {}, progress=False)
    assert earlier.read_bytes() == b"an earlier complete file" and len(list(out_dir.iterdir())) == 1


# ------------------------------------------------------------------------------------------
# Training batches.

@pytest.fixture
def image_set(tmp_path) -> tuple[Path, np.ndarray]:
    """data.h5 with 10 distinct 8x8 RGB images (neither uniform nor mirror-symmetric)."""
    images = pattern_images(10, 8, 8, 3, seed=6)
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(4, 8, 8, 3), compression="gzip")
        seal_h5(f)  # as every writer of the pipeline does
    return path, images


def as_model_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_batches_are_a_function_of_seed_and_step(image_set):
    path, images = image_set
    a = TrainingBatches(path, batch_size=4, seed=3)
    b = TrainingBatches(path, batch_size=4, seed=3)
    late = b.batch(7)  # asked first: no iteration state
    for step in range(8):
        x = a.batch(step)
        assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(a.batch(7), late, rtol=0, atol=0)
    other = TrainingBatches(path, batch_size=4, seed=4)
    assert not all(torch.equal(a.batch(s), other.batch(s)) for s in range(3))


def test_each_epoch_is_a_permutation_across_batch_boundaries(image_set):
    path, _ = image_set
    batches = TrainingBatches(path, batch_size=4, seed=0)
    stream = torch.cat([batches.sample_indices(step) for step in range(5)])  # 20 = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a fresh order each epoch
    big = TrainingBatches(path, batch_size=25, seed=0)  # one batch spans three epochs
    assert sorted(big.sample_indices(0)[:20].tolist()) == sorted(list(range(10)) * 2)
    torch.testing.assert_close(big.sample_indices(0)[:20], stream, rtol=0, atol=0)


def test_two_processes_equal_one_process_with_twice_the_batch(image_set):
    path, _ = image_set
    whole = TrainingBatches(path, batch_size=6, seed=1)
    halves = [TrainingBatches(path, batch_size=6, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        joined = torch.cat([h.batch(step) for h in halves])
        torch.testing.assert_close(joined, whole.batch(step), rtol=0, atol=0)
    with pytest.raises(PipelineError, match="multiple"):
        TrainingBatches(path, batch_size=5, seed=1, world_size=2)


def test_values_and_flips(image_set):
    path, images = image_set
    flipping = TrainingBatches(path, batch_size=8, seed=2)
    plain = TrainingBatches(path, batch_size=8, seed=2, random_flip=False)
    flipped_any = False
    for step in range(4):
        indices = plain.sample_indices(step).numpy()
        expected = as_model_input(images[indices])
        torch.testing.assert_close(plain.batch(step), expected, rtol=0, atol=1e-6)  # flip off: none
        x = flipping.batch(step)
        assert x.min() >= -1 and x.max() <= 1
        flips = flipping.flips(step)
        torch.testing.assert_close(x[~flips], expected[~flips], rtol=0, atol=1e-6)
        torch.testing.assert_close(x[flips], expected[flips].flip(3), rtol=0, atol=1e-6)
        flipped_any |= bool(flips.any()) and not bool(flips.all())
    assert flipped_any
    zero_and_full = np.zeros((2, 4, 4, 1), np.uint8)
    zero_and_full[1] = 255
    torch.testing.assert_close(as_model_input(zero_and_full).flatten().unique(), torch.tensor([-1.0, 1.0]))


def test_disk_mode_equals_memory_mode(image_set):
    path, _ = image_set
    memory = TrainingBatches(path, batch_size=4, seed=5)
    disk = TrainingBatches(path, batch_size=4, seed=5, max_memory_bytes=0)
    assert memory.in_memory and not disk.in_memory
    try:
        for step in [0, 1, 2, 3, 9, 2]:  # in order (prefetched), then jumps
            torch.testing.assert_close(disk.batch(step), memory.batch(step), rtol=0, atol=0)
    finally:
        disk.close()


def test_read_images_any_order(image_set):
    path, images = image_set
    np.testing.assert_array_equal(read_images(path, [7, 2, 7, 0]), images[[7, 2, 7, 0]])
    np.testing.assert_array_equal(read_images(path), images)
    assert read_labels(path) is None
    with pytest.raises(PipelineError, match="does not exist"):
        read_images(path.with_name("missing.h5"))
