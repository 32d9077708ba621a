"""Weight quantization (pipeline.quant, the quantize stage) and the resumable sample stage."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.integrity import save_torch
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.nn.presets import build_unet
from pipeline.quant import code_range, dequantize, parse_precision, quantize_state_dict, quantize_tensor
from pipeline.seeding import derive_seed
from pipeline.io.hashing import file_sha256
from pipeline.stages.quantize import quantize_file, read_codes
from pipeline.stages.sample import image_seeds, sample_range, sample_to_file, sampling_diffusion, save_grid

VARIANTS = [(bits, granularity, symmetric) for bits in (8, 6, 4)
            for granularity in ("per_tensor", "per_channel") for symmetric in (True, False)]
SAMPLE_STEPS = 5      # respaced steps T' where only the pixels' identity matters
QUANT_STEPS = 10      # T' of the fp32-vs-int8 comparison (its bounds were measured at 10)


pytestmark = pytest.mark.usefixtures("one_thread")


def weight_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state_dict: conv/linear/qkv-shaped weights at several scales, an all-positive
    matrix, an outlier, an all-zero channel, and 1-D tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "conv.weight": 0.05 * torch.randn(16, 8, 3, 3, generator=g),
        "linear.weight": 2.0 * torch.randn(24, 12, generator=g),
        "qkv.weight": 0.1 * torch.randn(12, 4, 1, generator=g),
        "positive.weight": 0.5 + torch.rand(6, 5, generator=g),
        "conv.bias": torch.randn(16, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(16, generator=g),
    }
    tensors["conv.weight"][3, 1, 1, 1] = 0.9  # one outlier sets the per-tensor range
    tensors["linear.weight"][5] = 0.0         # an all-zero output channel
    return tensors


# ------------------------------------------------------------------------------------------
# Precision names.

def test_parse_precision_names():
    assert parse_precision("fp32") is None
    assert parse_precision("int8") == {"bits": 8, "granularity": "per_tensor", "symmetric": True}
    assert parse_precision("int4pc") == {"bits": 4, "granularity": "per_channel", "symmetric": True}
    assert parse_precision("int6asym") == {"bits": 6, "granularity": "per_tensor", "symmetric": False}
    assert parse_precision("int8pcasym") == {"bits": 8, "granularity": "per_channel", "symmetric": False}


@pytest.mark.parametrize("name", ["int7", "int8asympc", "INT8", "fp16", "int8 ", "int16", ""])
def test_parse_precision_rejects_unknown_names(name):
    with pytest.raises(PipelineError, match=r"unknown precision .*fp32.*int8pc"):
        parse_precision(name)


# ------------------------------------------------------------------------------------------
# The quantizer.

@pytest.mark.parametrize("bits,granularity,symmetric", VARIANTS)
def test_requantizing_changes_nothing(bits, granularity, symmetric):
    first = quantize_state_dict(weight_tensors(), bits, granularity, symmetric)
    second = quantize_state_dict(first.dequantized, bits, granularity, symmetric)
    for name, codes in first.codes.items():
        assert torch.equal(second.codes[name], codes), name
        if symmetric:
            assert torch.equal(second.dequantized[name], first.dequantized[name]), name
        else:
            # The asymmetric range ends are rounded to float32 before s is recomputed (module doc).
            torch.testing.assert_close(second.dequantized[name], first.dequantized[name],
                                       rtol=torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("bits,granularity,symmetric", VARIANTS)
def test_at_most_2_to_the_b_values(bits, granularity, symmetric):
    result = quantize_state_dict(weight_tensors(), bits, granularity, symmetric)
    for name, deq in result.dequantized.items():
        if name not in result.codes:
            continue
        rows = deq.reshape(deq.shape[0], -1) if granularity == "per_channel" else deq.reshape(1, -1)
        assert max(len(torch.unique(row)) for row in rows) <= 2**bits, name
        # The grid is really used: 288 Gaussian weights fill far more than 64 of the 8-bit levels.
        if bits == 8 and name == "linear.weight":
            assert len(torch.unique(deq)) > 64


@pytest.mark.parametrize("bits,granularity,symmetric", VARIANTS)
def test_error_at_most_half_a_step(bits, granularity, symmetric):
    weights = weight_tensors()
    result = quantize_state_dict(weights, bits, granularity, symmetric)
    low, high = code_range(bits, symmetric)
    for name, codes in result.codes.items():
        w, deq = weights[name], result.dequantized[name]
        scale = result.scales[name]
        scale = scale.reshape(-1, *[1] * (w.ndim - 1)) if scale.ndim else scale
        # Min-max puts every weight inside the range; the float32 rounding of W_q adds one ulp.
        bound = scale / 2 + torch.finfo(torch.float32).eps * w.abs().to(torch.float64)
        assert ((w.to(torch.float64) - deq.to(torch.float64)).abs() <= bound).all(), name
        assert int(codes.min()) >= low and int(codes.max()) <= high
        assert torch.equal(dequantize(codes, result.scales[name], result.zero_points[name]), deq)


def test_one_dim_tensors_untouched_by_default():
    weights = weight_tensors()
    result = quantize_state_dict(weights)
    assert list(result.dequantized) == list(weights)
    for name in ("conv.bias", "norm.weight"):
        assert name not in result.codes
        assert torch.equal(result.dequantized[name], weights[name])
    assert set(result.codes) == {"conv.weight", "linear.weight", "qkv.weight", "positive.weight"}

    with_1d = quantize_state_dict(weights, bits=4, granularity="per_channel", include_1d=True)
    assert with_1d.codes["conv.bias"].shape == (16,) and with_1d.scales["conv.bias"].shape == ()
    assert len(torch.unique(with_1d.dequantized["norm.weight"])) <= 16


def test_symmetric_default_layout():
    result = quantize_state_dict(weight_tensors())
    codes, scale = result.codes["conv.weight"], result.scales["conv.weight"]
    assert codes.dtype == torch.int8 and scale.dtype == torch.float64 and scale.shape == ()
    assert int(codes.abs().max()) == 127
    # The largest magnitude is kept exactly: s = max|W| / 127.
    assert result.dequantized["conv.weight"].max() == weight_tensors()["conv.weight"].max()
    assert int(result.zero_points["conv.weight"]) == 0


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_asymmetric_codes_span_0_to_2b_minus_1(bits):
    result = quantize_state_dict(weight_tensors(), bits=bits, symmetric=False)
    for name, codes in result.codes.items():
        assert codes.dtype == torch.uint8
        assert 0 <= int(result.zero_points[name]) <= 2**bits - 1
        if name != "positive.weight":
            assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1, name
    # The range is widened to contain 0, so 0 stays exactly representable.
    positive = result.dequantized["positive.weight"]
    assert int(result.zero_points["positive.weight"]) == 0 and float(positive.min()) > 0


def test_all_zero_tensor_and_channel_have_no_nan():
    for granularity in ("per_tensor", "per_channel"):
        q = quantize_tensor(torch.zeros(4, 3), per_channel=granularity == "per_channel")
        assert torch.equal(q.dequantized, torch.zeros(4, 3)) and (q.scale == 1).all()
    result = quantize_state_dict(weight_tensors(), granularity="per_channel", symmetric=False)
    assert float(result.scales["linear.weight"][5]) == 1.0
    assert torch.equal(result.dequantized["linear.weight"][5], torch.zeros(12))


def test_nonfinite_weights_are_refused():
    weights = {"w": torch.tensor([[1.0, float("nan")]])}
    with pytest.raises(PipelineError, match="w: .*NaN"):
        quantize_state_dict(weights)


# ------------------------------------------------------------------------------------------
# The quantize stage.

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """Weights of the "tiny" preset with every tensor random: an untrained ADM UNet outputs
    exactly zero (zero-initialised output convs), which would make every model sample alike."""
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(1)
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    state = {name: (1.0 if name in norms else 0.0) + 0.05 * torch.randn(t.shape, generator=g)
             for name, t in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "weights_ema.pt"
    save_torch(state, path)
    return str(path)


def test_quantize_stage_writes_weights_and_codes(tiny_weights, tmp_path):
    out, codes = tmp_path / "weights.pt", tmp_path / "codes.h5"
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int8",
                 "--out", str(out), "--codes", str(codes)]) == 0
    original = torch.load(tiny_weights, weights_only=True)
    quantized = torch.load(out, weights_only=True)
    assert list(quantized) == list(original)

    stored = read_codes(codes)
    assert set(stored) == {k for k, v in original.items() if v.ndim >= 2}
    for name, tensor in quantized.items():
        if name in stored:
            assert torch.equal(stored[name], tensor), name       # the codes are the model
            assert not torch.equal(tensor, original[name]), name
        else:
            assert torch.equal(tensor, original[name]), name
    with h5py.File(codes, "r") as f:
        assert f.attrs["precision"] == "int8" and f.attrs["bits"] == 8
        assert f.attrs["granularity"] == "per_tensor" and bool(f.attrs["symmetric"])
        assert f.attrs["input_sha256"] == file_sha256(tiny_weights)
        assert f["tensors/out.2.weight/codes"].dtype == np.int8
        kept = json.loads(f.attrs["kept_fp32_json"])
        assert "out.2.bias" in kept and "out.0.weight" in kept


def test_quantize_stage_fp32_copies_and_rejects_unknown(tiny_weights, tmp_path):
    out, codes = tmp_path / "weights.pt", tmp_path / "codes.h5"
    quantize_file(tiny_weights, "fp32", out, codes)
    assert out.read_bytes() == Path(tiny_weights).read_bytes()
    with h5py.File(codes, "r") as f:
        assert f.attrs["precision"] == "fp32" and len(f["tensors"]) == 0
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int3",
                 "--out", str(tmp_path / "bad.pt")]) == 2
    assert not (tmp_path / "bad.pt").exists()


# ------------------------------------------------------------------------------------------
# The sample stage.

def tiny_sample_settings(**overrides) -> dict:
    settings = {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
                "n_samples": 4, "batch_size": 4, "chunk_size": 4, "seed": 0}
    return {**settings, **overrides}


def read_samples(path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["images"][:], {**dict(f.attrs), "seeds": f["seeds"][:]}


class PixelwiseModel(torch.nn.Module):
    """A stand-in for the UNet whose output is exactly independent of the batch: eps = x / 2,
    v = 0. With it, any difference between batch sizes could only come from the noise draws."""

    in_channels = 3

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)


def test_noise_streams_do_not_depend_on_batch_or_chunk():
    diffusion = sampling_diffusion(tiny_sample_settings(), SAMPLE_STEPS)
    def draw(start, stop, batch_size):
        return sample_range(PixelwiseModel(), diffusion, 0, start, stop, batch_size, image_size=16)
    whole = draw(0, 5, 5)
    np.testing.assert_array_equal(draw(0, 5, 1), whole)
    np.testing.assert_array_equal(draw(3, 5, 2), whole[3:])
    assert not np.array_equal(draw(0, 5, 5)[1:], whole[:-1])      # image i has its own stream


def test_samples_do_not_depend_on_batch_size(tiny_weights, tmp_path):
    for batch_size in (1, 4):
        sample_to_file(tiny_sample_settings(batch_size=batch_size), tiny_weights, tmp_path / f"b{batch_size}.h5",
                       tmp_path / f"b{batch_size}.png", SAMPLE_STEPS, progress=False)
    single, attrs = read_samples(tmp_path / "b1.h5")
    batched, _ = read_samples(tmp_path / "b4.h5")
    assert single.shape == (4, 16, 16, 3) and single.dtype == np.uint8
    # Same x_T and noises; the UNet's kernels may round differently at batch 1 and 4 (~1e-7),
    # which moves a pixel sitting on a uint8 boundary by one level.
    differ = single.astype(int) - batched
    assert np.abs(differ).max() <= 1 and (differ != 0).mean() < 0.01
    assert len({image.tobytes() for image in single}) == 4       # every image has its own noise
    assert attrs["steps"] == SAMPLE_STEPS and attrs["n"] == 4
    assert attrs["weights_sha256"] == file_sha256(tiny_weights)
    np.testing.assert_array_equal(attrs["seeds"], [derive_seed(0, i, stream="sample") for i in range(4)])


def test_quantized_samples_differ_by_a_bounded_amount(tiny_weights, tmp_path):
    mean_abs_diff = {}
    images = {}
    for precision in ("fp32", "int8", "int4"):
        weights = tmp_path / f"{precision}.pt"
        quantize_file(tiny_weights, precision, weights, tmp_path / f"{precision}.h5")
        sample_to_file(tiny_sample_settings(), weights, tmp_path / f"s_{precision}.h5", tmp_path / f"{precision}.png",
                       QUANT_STEPS, progress=False)
        images[precision], attrs = read_samples(tmp_path / f"s_{precision}.h5")
        assert attrs["weights_sha256"] == file_sha256(weights)
        mean_abs_diff[precision] = np.abs(images[precision].astype(int) - images["fp32"]).mean()
    other_noise = np.abs(images["fp32"][0].astype(int) - images["fp32"][1]).mean()
    # Measured on this net: int8 1.6 levels, int4 16, two different noises 108.
    assert 0 < mean_abs_diff["int8"] < 8 < other_noise
    assert mean_abs_diff["int8"] < mean_abs_diff["int4"]


def test_chunks_of_other_settings_are_discarded_not_reused(tiny_weights, tmp_path):
    settings = tiny_sample_settings(n_samples=5, chunk_size=2, batch_size=2)
    out, grid = tmp_path / "samples.h5", tmp_path / "grid.png"
    sample_to_file(settings, tiny_weights, out, grid, SAMPLE_STEPS, progress=False, stop_after_chunks=2)
    # Other seeds (as after a retraining, other weights) start from chunk 0 again.
    computed = sample_to_file({**settings, "seed": 1}, tiny_weights, out, grid, SAMPLE_STEPS, progress=False)
    assert computed == [0, 1, 2]
    with h5py.File(out) as f:
        assert list(f["seeds"][()]) == list(image_seeds(1, 0, 5))


def test_killed_sampling_resumes_from_finished_chunks(tiny_weights, tmp_path):
    settings = tiny_sample_settings(n_samples=5, chunk_size=2, batch_size=2)
    out, grid = tmp_path / "run" / "samples.h5", tmp_path / "run" / "grid.png"
    scratch = out.parent / ".samples.h5.chunks"

    # A "kill" after two of three chunks: nothing final is written, the finished chunks are kept.
    assert sample_to_file(settings, tiny_weights, out, grid, SAMPLE_STEPS, progress=False,
                          stop_after_chunks=2) == [0, 1]
    assert not out.exists() and not grid.exists()
    assert sorted(p.name for p in scratch.iterdir()) == ["chunk_000000.npz", "chunk_000001.npz", "run.json"]

    # The rerun computes only the missing chunk and cleans up.
    assert sample_to_file(settings, tiny_weights, out, grid, SAMPLE_STEPS, progress=False) == [2]
    assert not scratch.exists()
    with Image.open(grid) as picture:
        assert picture.mode == "RGB" and picture.size == (5 * 16 + 6 * 2, 16 + 2 * 2)

    # Same pixels as an uninterrupted run (made through the command line).
    whole = tmp_path / "whole" / "samples.h5"
    assert main(["sample", "--weights", tiny_weights, "--dataset", "test", "--steps", str(SAMPLE_STEPS),
                 "--settings", json.dumps(settings), "--out", str(whole), "--no-progress"]) == 0
    assert (whole.parent / "grid.png").exists()
    np.testing.assert_array_equal(read_samples(out)[0], read_samples(whole)[0])


def test_grid_layout_grayscale(tmp_path):
    images = np.arange(10 * 4 * 5, dtype=np.uint8).reshape(10, 4, 5, 1)
    save_grid(images, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.mode == "L" and picture.size == (8 * 5 + 9 * 2, 2 * 4 + 3 * 2)
        canvas = np.asarray(picture)
    np.testing.assert_array_equal(canvas[2:6, 2:7], images[0, ..., 0])
    np.testing.assert_array_equal(canvas[8:12, 2:7], images[8, ..., 0])    # second row, first column
    assert canvas[0].max() == 0
