"""Fault injection: damaged artifacts, crafted pickles, killed writers, full and read-only disks.

Every damaged final artifact stops its reader with one line naming the file; every damaged
resumable cache (checkpoint, sample chunk) is discarded and recomputed to the same result; no
pickle payload runs; no disk error prints a traceback or leaves a temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pipeline.fidelity.extractors as extractors
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.data.hdf5 import open_image_set, read_images
from pipeline.errors import PipelineError, disk_error_message
from pipeline.fidelity.stats import FeatureStats, H5Images, image_shape, read_reference, write_reference
from pipeline.io.atomic import atomic_path
from pipeline.io.checkpoint import load_checkpoint, load_weights
from pipeline.io.hashing import file_sha256
from pipeline.io.integrity import DamagedFile, artifact_sha256, save_torch, sealed_h5
from pipeline.nn.presets import build_unet
from pipeline.settings import train_settings
from pipeline.stages.sample import sample_to_file
from pipeline.stages.train import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# Damage: bytes overwritten in the middle of a file, its length unchanged.

def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def dataset_offset(path: Path, name: str) -> tuple[int, int]:
    """(file offset, stored size) of a dataset's bytes: its first chunk, or its contiguous data."""
    with h5py.File(path, "r") as f:
        dataset = f[name]
        if dataset.chunks:
            info = dataset.id.get_chunk_info(0)
            return info.byte_offset, info.size
        return dataset.id.get_offset(), dataset.id.get_storage_size()


def damage_dataset(path: Path, name: str) -> None:
    offset, size = dataset_offset(path, name)
    flip_bytes(path, offset + size // 2)


def damage_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Overwrite bytes in the middle of `tensor`'s storage inside a torch.save file."""
    raw = path.read_bytes()
    payload = tensor.detach().cpu().contiguous().numpy().tobytes()
    at = raw.find(payload)
    assert at >= 0, "tensor bytes not found in the file"
    flip_bytes(path, at + len(payload) // 2)


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message


# ------------------------------------------------------------------------------------------
# HDF5 artifacts: data.h5, samples.h5, fid_ref_*.h5.

def write_images_h5(path: Path, n: int = 32, compression: str | None = "gzip") -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    with sealed_h5(path) as f:
        f.create_dataset("images", data=images, chunks=(8, 16, 16, 3), compression=compression)
        f.attrs["count"] = n
    return images


@pytest.mark.parametrize("compression", ["gzip", None])
def test_damaged_data_h5_is_one_line_naming_the_file(tmp_path, compression):
    path = tmp_path / "data.h5"
    images = write_images_h5(path, compression=compression)
    np.testing.assert_array_equal(read_images(path), images)  # intact: reads back
    fresh = tmp_path / "copy" / "data.h5"  # a new file: the verified-file memo must not apply
    fresh.parent.mkdir()
    fresh.write_bytes(path.read_bytes())
    damage_dataset(fresh, "images")
    with pytest.raises(DamagedFile) as caught:
        open_image_set(fresh)
    message = str(caught.value)
    assert str(fresh) in message and "damaged" in message and "prepare" in message and one_line(message)


def test_damaged_samples_h5_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "samples.h5"
    write_images_h5(path, compression="gzip")
    damage_dataset(path, "images")
    with pytest.raises(DamagedFile) as caught:
        image_shape(H5Images(path))
    assert str(path) in str(caught.value) and "rerun the rule that makes it" in str(caught.value)
    assert one_line(str(caught.value))


def test_damaged_attribute_is_caught(tmp_path):
    path = tmp_path / "samples.h5"
    write_images_h5(path)
    with h5py.File(path, "r+") as f:  # an edit that bypasses the writer: count 32 -> 33
        f.attrs["count"] = 33
    with pytest.raises(DamagedFile, match="attributes do not match"):
        image_shape(H5Images(path))


def test_damaged_fd_reference_never_becomes_a_number(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 6))
    stats = FeatureStats(features.mean(0), np.cov(features, rowvar=False), 40,
                         features[:10].astype(np.float32), np.arange(10))
    path = tmp_path / "fid_ref_tiny.h5"
    attrs = {"extractor": "tiny", "weights_sha256": "x", "n_images": 40, "image_height": 16,
             "image_width": 16, "image_channels": 3}
    write_reference(path, stats, attrs)
    np.testing.assert_array_equal(read_reference(path).stats.sigma, stats.sigma)
    damage_dataset(path, "sigma")
    with pytest.raises(DamagedFile) as caught:
        read_reference(path)
    assert str(path) in str(caught.value) and "fid-reference" in str(caught.value)


def test_unsealed_hdf5_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(DamagedFile, match="carries no content checksum.*delete it and rerun"):
        open_image_set(path)


# ------------------------------------------------------------------------------------------
# torch files: weights, quantized weights, checkpoints.

def test_damaged_weights_stop_with_one_line(tmp_path):
    state = {"a": torch.randn(64, 64), "b": torch.arange(10.0)}
    path = tmp_path / "weights_raw.pt"
    save_torch(state, path)
    assert torch.equal(load_weights(path)["a"], state["a"])
    # Still a plain state_dict for any other tool.
    assert set(torch.load(path, weights_only=True)) == {"a", "b"}
    damage_tensor(path, state["a"])
    with pytest.raises(DamagedFile) as caught:
        load_weights(path)
    assert str(path) in str(caught.value) and "rerun the rule that makes it" in str(caught.value)
    assert one_line(str(caught.value))


def test_damaged_weights_through_the_cli(tmp_path, capsys):
    state = {"a": torch.randn(32, 32)}
    weights = tmp_path / "weights_raw.pt"
    save_torch(state, weights)
    damage_tensor(weights, state["a"])
    code = cli_main(["quantize", "--weights", str(weights), "--precision", "int8",
                     "--out", str(tmp_path / "int8" / "weights.pt")])
    err = capsys.readouterr().err
    assert code == 2 and str(weights) in err and "damaged" in err and one_line(err)
    assert not (tmp_path / "int8").exists() or not any((tmp_path / "int8").iterdir())


def tiny_train_settings(**overrides) -> dict:
    config = load_config([REPO / "config.yaml", REPO / "config" / "demo.yaml"])
    config["training"]["optimizer"]["lr"] = 1.0e-4
    settings = train_settings(config, "fashion_mnist", "adm", seed=3)
    settings.update(preset="tiny", resolution=16, batch_size=4, steps=6, log_every=2,
                    checkpoint_every=2, device="cpu", swa={"start_fraction": 0.5, "every": 1})
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.h5"
    grid = np.add.outer(np.arange(16), np.arange(16))
    images = np.stack([(grid * (i % 7 + 1)) % 256 for i in range(32)]).astype(np.uint8)[..., None]
    with sealed_h5(path) as f:
        f.create_dataset("images", data=images)
    return path


@pytest.fixture(scope="module")
def uninterrupted(train_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_train_settings(), train_data, out, progress=False)
    return load_weights(out / "weights_raw.pt")


def test_damaged_checkpoint_is_discarded_and_recomputed(train_data, uninterrupted, tmp_path, capfd):
    train(tiny_train_settings(), train_data, tmp_path, stop_after=4, progress=False)
    (ckpt_path,) = tmp_path.glob("checkpoint-*.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    exp_avg_sq = next(s["exp_avg_sq"] for s in ckpt["optimizer"]["state"].values() if s["exp_avg_sq"].numel() > 64)
    damage_tensor(ckpt_path, exp_avg_sq)
    capfd.readouterr()
    train(tiny_train_settings(), train_data, tmp_path, progress=False)
    err = capfd.readouterr().err
    assert "warning: discarding checkpoint" in err and str(ckpt_path) in err
    resumed = load_weights(tmp_path / "weights_raw.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_log_interval_change_resumes_instead_of_restarting(train_data, uninterrupted, tmp_path):
    train(tiny_train_settings(), train_data, tmp_path, stop_after=4, progress=False)
    (before,) = tmp_path.glob("checkpoint-*.pt")
    assert int(torch.load(before, weights_only=True)["step"]) == 4
    # New log and checkpoint intervals: the same checkpoint name, so the run goes on from step 4.
    train(tiny_train_settings(log_every=3, checkpoint_every=1), train_data, tmp_path, stop_after=1,
          progress=False)
    (after,) = tmp_path.glob("checkpoint-*.pt")
    assert after == before and int(torch.load(after, weights_only=True)["step"]) == 5
    train(tiny_train_settings(log_every=3, checkpoint_every=1), train_data, tmp_path, progress=False)
    resumed = load_weights(tmp_path / "weights_raw.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    with h5py.File(tmp_path / "train.h5") as f:
        assert f["loss"].shape == (6,)


def test_killed_writers_leave_temporaries_the_next_run_removes(train_data, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_weights = tmp_path / f".weights_raw.pt.tmp-{dead.pid}"
        stale_ckpt = tmp_path / f".checkpoint-0123456789ab.pt.tmp-{dead.pid}"
        live_weights = tmp_path / f".weights_raw.pt.tmp-{alive.pid}"
        for path in (stale_weights, stale_ckpt, live_weights):
            path.write_bytes(b"half a file")
        train(tiny_train_settings(steps=2), train_data, tmp_path, progress=False)
        assert not stale_weights.exists() and not stale_ckpt.exists()
        assert live_weights.exists(), "a running writer's temporary file is not touched"
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------------
# Sample chunks: a damaged chunk is recomputed, the result is unchanged.

@pytest.fixture(scope="module")
def sample_weights(tmp_path_factory) -> Path:
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(1)
    state = {name: t + 0.05 * torch.randn(t.shape, generator=g) for name, t in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "weights.pt"
    save_torch(state, path)
    return path


def sample_settings() -> dict:
    return {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
            "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
            "n_samples": 6, "batch_size": 2, "chunk_size": 2, "seed": 0}


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_sample_chunk_is_recomputed(sample_weights, tmp_path, capsys, damage):
    reference = tmp_path / "reference" / "samples.h5"
    sample_to_file(sample_settings(), sample_weights, reference, reference.with_suffix(".png"), 3, progress=False)
    out = tmp_path / "run" / "samples.h5"
    assert sample_to_file(sample_settings(), sample_weights, out, out.with_suffix(".png"), 3,
                          progress=False, stop_after_chunks=2) == [0, 1]
    chunk = out.parent / ".samples.h5.chunks" / "chunk_000001.npz"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    else:
        with np.load(chunk) as z:
            images = z["images"]
        raw = chunk.read_bytes()
        flip_bytes(chunk, raw.find(images.tobytes()) + images.nbytes // 2)
    capsys.readouterr()
    assert sample_to_file(sample_settings(), sample_weights, out, out.with_suffix(".png"), 3,
                          progress=False) == [1, 2]
    assert "discarding" in capsys.readouterr().err
    with h5py.File(out) as got, h5py.File(reference) as expected:
        np.testing.assert_array_equal(got["images"][...], expected["images"][...])


# ------------------------------------------------------------------------------------------
# Pickle payloads: no loader runs them.

class Payload:
    """Unpickling this object creates `marker` (through builtins.open)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_file(path: Path, marker: Path, sealed: bool = True) -> Path:
    """A torch.save file of a state_dict whose value unpickles by calling open(marker, "w")."""
    obj = {"input_blocks.0.0.weight": Payload(marker)}
    if sealed:  # a valid checksum: the hash check alone must not be what stops it
        save_torch(obj, path)
    else:
        torch.save(obj, path)
    return path


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The check of the checks: the crafted file does create the marker under weights_only=False."""
    marker = tmp_path / "ran"
    torch.load(payload_file(tmp_path / "p.pt", marker), weights_only=False)
    assert marker.exists()


def test_no_loader_runs_a_pickle_payload(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    errors = []

    def expect_one_line_error(call) -> None:
        with pytest.raises(PipelineError) as caught:
            call()
        errors.append(str(caught.value))

    weights = payload_file(tmp_path / "weights.pt", marker)
    expect_one_line_error(lambda: load_weights(weights))
    expect_one_line_error(lambda: cli_main_or_raise(["quantize", "--weights", str(weights), "--precision",
                                                     "int8", "--out", str(tmp_path / "q" / "w.pt")]))
    # A checkpoint is a cache: discarded with a warning, the run starting over.
    checkpoint = payload_file(tmp_path / "checkpoint-0.pt", marker)
    assert load_checkpoint(checkpoint) is None and not checkpoint.exists()
    # Inception: the file passes the hash check (the expected prefix is this file's), so only
    # the weights_only load stands between the payload and the interpreter.
    inception = payload_file(tmp_path / "inception.pth", marker, sealed=False)
    monkeypatch.setattr(extractors, "inception_sha256_prefix", lambda: file_sha256(inception)[:8])
    expect_one_line_error(lambda: extractors.load_inception(inception, "2048", cuda=False))
    effnet = payload_file(tmp_path / "effnet.pth", marker, sealed=False)
    expect_one_line_error(lambda: extractors.EfficientNetLite0Features("effnet-lite0", ["1280"],
                                                                       feature_extractor_weights_path=effnet))
    assert not marker.exists(), "a pickle payload ran"
    assert len(errors) == 4 and all(one_line(e) for e in errors), errors


def cli_main_or_raise(argv: list[str]) -> None:
    """cli.main, with its printed one-line error turned back into a PipelineError for the test."""
    import io

    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        code = cli_main(argv)
        text = sys.stderr.getvalue()
    finally:
        sys.stderr = stderr
    if code == 2:
        raise PipelineError(text.strip().removeprefix("error: "))


def test_inception_weights_of_the_wrong_hash_are_refused(tmp_path):
    fake = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, fake)
    with pytest.raises(PipelineError, match=r"not the official 6726825d\.\.\..*delete it") as caught:
        extractors.resolve_inception_weights(fake)
    assert one_line(str(caught.value))


# ------------------------------------------------------------------------------------------
# Full, read-only and forbidden disks.

def test_disk_errors_are_one_line_naming_the_path():
    for code, words in ((errno.ENOSPC, "free space"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")):
        message = disk_error_message(OSError(code, os.strerror(code), "/results/x.h5"))
        assert message.startswith("/results/x.h5: ") and words in message and one_line(message)
    assert disk_error_message(OSError(errno.ENOENT, "gone", "x")) is None


@contextlib.contextmanager
def small_tmpfs(size: str = "1m", read_only: bool = False):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    where = Path(f"/tmp/pipeline-faults-{uuid.uuid4().hex[:8]}")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def make_idx(folder: Path, count: int) -> None:
    """Fashion-MNIST IDX files of random (incompressible) images: count * 784 bytes."""
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4I", 0x803, count, 28, 28) + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 0x801, count) + (np.arange(count) % 10).astype(np.uint8).tobytes())


def run_pipeline(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    make_idx(tmp_path / "fm", 3000)  # 2.3 MB of images for a 1 MB disk
    with small_tmpfs("1m") as disk:
        out = disk / "fashion_mnist" / "data.h5"
        done = run_pipeline("prepare", "--dataset", "fashion_mnist", "--source", str(tmp_path / "fm"),
                            "--no-download", "--max-images", "3000", "--out", str(out), "--no-progress")
        assert done.returncode == 2, (done.returncode, done.stderr[-3000:])  # not a crash (-11)
        assert one_line(done.stderr) and str(out) in done.stderr and "No space left" in done.stderr
        assert not [p for p in disk.rglob("*") if p.is_file()], "temporary files left behind"


def test_saving_weights_on_a_full_disk_names_the_file(tmp_path):
    with small_tmpfs("1m") as disk:
        with pytest.raises(OSError) as caught:
            save_torch({"a": torch.zeros(1_000_000)}, disk / "weights_raw.pt")
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(disk / "weights_raw.pt")
        assert not list(disk.iterdir())


def test_read_only_results_folder_is_one_line(tmp_path):
    make_idx(tmp_path / "fm", 20)
    with small_tmpfs("1m", read_only=True) as disk:
        done = run_pipeline("prepare", "--dataset", "fashion_mnist", "--source", str(tmp_path / "fm"),
                            "--no-download", "--max-images", "20", "--out", str(disk / "fashion_mnist" / "data.h5"),
                            "--no-progress")
        assert done.returncode == 2 and one_line(done.stderr), done.stderr[-3000:]
        assert "Read-only file system" in done.stderr and str(disk / "fashion_mnist") in done.stderr


def test_failed_atomic_write_removes_its_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.h5") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []


def test_zip_without_checksum_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(DamagedFile, match="carries no content checksum"):
        load_weights(path)
    with zipfile.ZipFile(path) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".content_sha256")]


def test_damaged_sample_run_key_restarts_the_scratch_folder(sample_weights, tmp_path, capsys):
    out = tmp_path / "samples.h5"
    sample_to_file(sample_settings(), sample_weights, out, out.with_suffix(".png"), 3, progress=False,
                   stop_after_chunks=1)
    (out.parent / ".samples.h5.chunks" / "run.json").write_bytes(b"{\x00damaged")
    assert sample_to_file(sample_settings(), sample_weights, out, out.with_suffix(".png"), 3,
                          progress=False) == [0, 1, 2]
    assert "discarding" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Non-finite weights and results: refused at load, never written (issue 25, point 1).

MEASURES = ("lpf", "perturbation", "surface", "hessian", "exposure")


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory) -> Path:
    """A prepared-looking data.h5: 8 RGB 16x16 images with consistent attributes."""
    path = tmp_path_factory.mktemp("rgb") / "data.h5"
    images = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    with sealed_h5(path) as f:
        f.create_dataset("images", data=images)
        f.attrs.update(resolution=16, channels=3, count=8)
    return path


def poisoned_weights(folder: Path, value: float) -> tuple[Path, str]:
    """Tiny-UNet weights, sealed properly, with one element of one tensor set to `value`."""
    state = build_unet("tiny", in_channels=3).state_dict()
    name = next(k for k, t in state.items() if t.is_floating_point() and t.dim() > 1)
    state[name].view(-1)[3] = value
    path = folder / "weights_raw.pt"
    save_torch(state, path)
    return path, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("stage", ("sample", *MEASURES))
def test_non_finite_weights_are_refused_by_every_reader(tmp_path, rgb_data, capsys, stage, value):
    weights, tensor = poisoned_weights(tmp_path, value)
    out = tmp_path / stage / "out.h5"
    if stage == "sample":
        settings = {**sample_settings(), "n_samples": 2}
        argv = ["sample", "--weights", str(weights), "--dataset", "test", "--steps", "2",
                "--settings", json.dumps(settings), "--out", str(out)]
    else:
        argv = [stage, "--weights", str(weights), "--data", str(rgb_data), "--preset", "tiny",
                "--config", str(REPO / "config.yaml"), "--device", "cpu", "--out", str(out)]
    capsys.readouterr()
    assert cli_main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and str(weights) in err and f"'{tensor}'" in err and "NaN or infinite" in err
    assert not out.parent.exists(), "nothing is written, not even the output folder"


def test_sampling_that_overflows_writes_nothing(sample_weights, tmp_path, monkeypatch):
    import pipeline.stages.sample as sample_stage

    monkeypatch.setattr(sample_stage, "sample_images", lambda *a, **k: torch.full((2, 3, 16, 16), float("nan")))
    out = tmp_path / "samples.h5"
    with pytest.raises(PipelineError, match=r"NaN or infinite pixels in images 0\.\.1") as caught:
        sample_to_file(sample_settings(), sample_weights, out, out.with_suffix(".png"), 3, progress=False)
    assert one_line(str(caught.value)) and not out.exists()


def test_non_finite_measure_results_are_not_written(tmp_path):
    from pipeline.stages.metric_common import refuse_non_finite

    # NaN where it means "undefined" (a spread over one draw) is a result; inf never is.
    refuse_non_finite("lpf", tmp_path / "x.h5", {"absolute/stderr": np.nan, "loss": 1.0, "n": np.arange(3)})
    for arrays in ({"absolute/lpf": np.float64("nan")}, {"losses": np.array([1.0, np.inf])},
                   {"trace_stderr": np.inf}):
        with pytest.raises(PipelineError, match=r"result '.*' holds 1 NaN or infinite value\(s\)") as caught:
            refuse_non_finite("lpf", tmp_path / "x.h5", arrays)
        assert str(tmp_path / "x.h5") in str(caught.value) and one_line(str(caught.value))


def test_non_finite_fd_is_never_written(tmp_path, capsys):
    from test_fidelity import TINY, blobs, write_images  # registers the tiny extractor

    from pipeline.fidelity import resolve_extractor
    from pipeline.io.integrity import seal_h5
    from pipeline.stages.fid_reference import build_reference

    data = write_images(tmp_path / "data.h5", blobs(40, seed=0), dataset="synthetic")
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                kid_rows=30, batch_size=40)
    samples = write_images(tmp_path / "samples.h5", blobs(30, seed=5))
    with h5py.File(reference, "a") as f:  # sealed again: intact, but its mean is not a number
        f["mu"][0] = np.nan
        seal_h5(f)
    out = tmp_path / "fid_tiny.h5"
    capsys.readouterr()
    assert cli_main(["fid", "--samples", str(samples), "--reference", str(reference), "--out", str(out),
                     "--kid-subsets", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith("error: fid: the FD of") and "not finite" in err and not out.exists()


# ------------------------------------------------------------------------------------------
# data.h5 that disagrees with itself (issue 25, point 2).

def write_data(path: Path, images: np.ndarray, labels: np.ndarray | None = None, **attrs) -> Path:
    with sealed_h5(path) as f:
        f.create_dataset("images", data=images)
        if labels is not None:
            f.create_dataset("labels", data=labels)
        f.attrs.update(attrs)
    return path


@pytest.mark.parametrize("case, expected", [
    ("rgb_says_gray", r"'images' has shape \(6, 16, 16, 3\) \(channels 3\) but the file's attribute says channels=1"),
    ("short_labels", r"'labels' has shape \(1,\) for 6 images in 'images'; one label per image"),
    ("channels_first", r"shape \(6, 3, 16, 16\), which is channels-first \(N, C, H, W\)"),
    ("count", r"\(count 6\) but the file's attribute says count=7"),
    ("resolution", r"\(resolution 16\) but the file's attribute says resolution=32"),
])
def test_data_h5_that_disagrees_with_itself_is_refused(tmp_path, case, expected):
    rgb = np.zeros((6, 16, 16, 3), np.uint8)
    path = tmp_path / "data.h5"
    if case == "rgb_says_gray":
        write_data(path, rgb, channels=1, resolution=16, count=6)
    elif case == "short_labels":
        write_data(path, rgb, np.arange(1), channels=3, count=6)
    elif case == "channels_first":
        write_data(path, rgb.transpose(0, 3, 1, 2).copy(), channels=3)
    elif case == "count":
        write_data(path, rgb, count=7)
    else:
        write_data(path, rgb, resolution=32)
    with pytest.raises(PipelineError, match=expected) as caught:
        open_image_set(path)
    assert str(path) in str(caught.value) and "prepare" in str(caught.value) and one_line(str(caught.value))
    from pipeline.data.loader import TrainingBatches

    with pytest.raises(PipelineError, match=expected):  # training reads it through the same check
        TrainingBatches(path, batch_size=2, seed=0)


# ------------------------------------------------------------------------------------------
# Two writers of the same outputs; writability before compute (issue 25, points 3 and 6).

HOLD_LOCK = """
import sys, time
from pipeline.io.lock import claim_outputs
claim_outputs(folders=[sys.argv[1]])
print("held", flush=True)
time.sleep(120)
"""


def pipeline_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def test_second_writer_names_the_holder_and_a_dead_holder_frees_the_lock(train_data, tmp_path):
    run_dir = tmp_path / "results" / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=tmp_path, env=pipeline_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = tmp_path / "checkout2"  # another working directory naming the same results folder
        other.mkdir()
        argv = [sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist", "--recipe", "adm",
                "--settings", json.dumps(tiny_train_settings(steps=2)), "--data", str(train_data),
                "--out-dir", str(run_dir), "--no-progress"]
        done = subprocess.run(argv, cwd=other, env=pipeline_env(PIPELINE_LOCK_TIMEOUT="1"),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert f"PID {holder.pid} on host" in last and str(run_dir / ".lock") in last
        assert "Traceback" not in done.stderr and not list(run_dir.glob("*.pt"))
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file and its record stay behind
        holder.wait()
    assert (run_dir / ".lock").exists()
    done = subprocess.run(argv, cwd=other, env=pipeline_env(PIPELINE_LOCK_TIMEOUT="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"taking over the lock record of PID {holder.pid}" in done.stderr
    assert (run_dir / "weights_raw.pt").exists() and not (run_dir / ".lock").exists()


def test_two_concurrent_trainings_of_one_run_do_not_interleave(train_data, tmp_path):
    run_dir = tmp_path / "shared" / "run"
    argv = [sys.executable, "-m", "pipeline", "train", "--dataset", "fashion_mnist", "--recipe", "adm",
            "--settings", json.dumps(tiny_train_settings(steps=4)), "--data", str(train_data),
            "--out-dir", str(run_dir), "--no-progress"]
    jobs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        jobs.append(subprocess.Popen(argv, cwd=tmp_path / name, env=pipeline_env(), stderr=subprocess.PIPE,
                                     text=True))
    errs = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], errs
    assert any("waiting for" in err and "locked by PID" in err for err in errs), errs
    alone = tmp_path / "alone"
    train(tiny_train_settings(steps=4), train_data, alone, progress=False)
    assert (run_dir / "weights_raw.pt").read_bytes() == (alone / "weights_raw.pt").read_bytes()


def test_read_only_run_folder_is_refused_before_the_compute(tmp_path, rgb_data, capsys):
    weights, _ = poisoned_weights(tmp_path, 0.0)
    where = Path(f"/tmp/pipeline-ro-{uuid.uuid4().hex[:8]}")
    where.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            where.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        (where / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    else:
        (where / "run").mkdir()
        (where / "run").chmod(0o555)
    try:
        calls = []
        import pipeline.flatness.model_setup as model_setup

        real = model_setup.load_weights
        model_setup.load_weights = lambda path: calls.append(path) or real(path)
        try:
            code = cli_main(["lpf", "--weights", str(weights), "--data", str(rgb_data), "--preset", "tiny",
                             "--config", str(REPO / "config.yaml"), "--device", "cpu",
                             "--out", str(where / "run" / "lpf.h5"), "--no-progress"])
        finally:
            model_setup.load_weights = real
        err = capsys.readouterr().err
        assert code == 2 and one_line(err) and f"{where / 'run'}: " in err, err
        assert ("Read-only" in err or "Permission denied" in err) and calls == [], "refused before loading"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(where)], check=False)
        else:
            (where / "run").chmod(0o755)
            (where / "run").rmdir()
        where.rmdir()


# ------------------------------------------------------------------------------------------
# Byte-reproducible artifacts (issue 25, point 7).

def test_identical_runs_write_identical_weights_and_samples(train_data, tmp_path):
    import time

    runs = [tmp_path / "one", tmp_path / "two"]
    for run in runs:
        train(tiny_train_settings(steps=2), train_data, run, progress=False)
        time.sleep(1.1)  # the old seal stamped the current time (2 s resolution in zip)
    names = sorted(p.name for p in runs[0].glob("weights_*.pt"))
    assert "weights_raw.pt" in names and names == sorted(p.name for p in runs[1].glob("weights_*.pt"))
    for name in names:
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    # Sampling each run's weights at the same paths (paths are settings): equal content, equal
    # weights_sha256, and the same identity for fid to record, though the times differ.
    settings = {**sample_settings(), "n_samples": 2, "diffusion": dict(tiny_train_settings()["diffusion"])}
    place = tmp_path / "sample"
    place.mkdir()
    records = []
    for run in runs:
        shutil.copyfile(run / "weights_raw.pt", place / "weights_raw.pt")
        sample_to_file(settings, place / "weights_raw.pt", place / "samples.h5", place / "grid.png", 2,
                       progress=False)
        with h5py.File(place / "samples.h5") as f:
            records.append((f.attrs["weights_sha256"], f["images"].attrs["content_sha256"],
                            f["seeds"].attrs["content_sha256"], artifact_sha256(place / "samples.h5", ""),
                            f.attrs["created_utc"]))
        time.sleep(1.1)
    assert records[0][:4] == records[1][:4] and records[0][4] != records[1][4]


def test_artifact_identity_leaves_out_host_and_time_only(tmp_path):
    identities = []
    for name, host, created, count in (("a", "node1", "2026-01-01", 3), ("b", "node2", "2026-02-02", 3),
                                       ("c", "node1", "2026-01-01", 4)):
        with sealed_h5(tmp_path / f"{name}.h5") as f:
            f.create_dataset("images", data=np.zeros((3, 4, 4, 1), np.uint8))
            f.attrs.update(host=host, created_utc=created, wall_seconds=len(name), count=count)
        identities.append(artifact_sha256(tmp_path / f"{name}.h5", ""))
    assert identities[0] == identities[1] != identities[2]
    assert artifact_sha256(tmp_path / "a.h5", "") != file_sha256(tmp_path / "a.h5")
