"""Clip-and-round quantization (intBclip): the grid, clipping, 1-D tensors, idempotence, and the
config slice that carries the clip range from config.yaml through the rule's params to the stage."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from pipeline.io.integrity import save_torch
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.nn.presets import build_unet
from pipeline.precision import parse_precision, precision_scheme
from pipeline.quant import clip_levels, clip_quantize_state_dict, clip_quantize_tensor
from pipeline.settings import stage_settings
from pipeline.stages.quantize import read_codes


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Weights inside and outside [-1, 1], exact zeros, 1-D and 0-D tensors, an integer buffer."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": 0.05 * torch.randn(8, 4, 3, 3, generator=g),
        "linear.weight": 2.0 * torch.randn(6, 5, generator=g),    # many beyond the range
        "conv.bias": torch.zeros(8),                               # zero-initialised
        "norm.weight": 1 + 0.1 * torch.randn(8, generator=g),      # about half above 1
        "scalar": torch.tensor(-3.0),
        "steps": torch.tensor([7, 9]),                             # not floating: copied
    }


def test_clip_precision_names():
    assert parse_precision("int8clip") == {"scheme": "clip", "bits": 8}
    assert parse_precision("int4clip") == {"scheme": "clip", "bits": 4}
    assert precision_scheme(parse_precision("int6clip")) == "clip"
    assert precision_scheme(parse_precision("int6pcasym")) == "minmax"
    assert precision_scheme(None) is None
    for name in ("int8pcclip", "int8clipasym", "clip8", "int8clip ", "int7clip"):
        with pytest.raises(PipelineError, match=r"unknown precision .*int8clip"):
            parse_precision(name)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("clip", [1.0, 0.3])
def test_levels_are_k_times_c_over_q_with_zero(bits, clip):
    q = 2 ** (bits - 1) - 1
    levels = clip_levels(bits, clip)
    assert len(levels) == 2 * q + 1 < 2 ** bits + 1
    np.testing.assert_allclose(np.diff(levels.numpy()), clip / q, rtol=1e-12)
    assert levels[q] == 0 and levels[0] == -levels[-1]
    assert float(levels[-1]) == pytest.approx(clip, rel=1e-15)

    # A dense sweep over twice the range hits every level and nothing else.
    sweep = torch.linspace(-2 * clip, 2 * clip, 20001)
    result = clip_quantize_tensor(sweep, bits, clip)
    values = torch.unique(result.dequantized)
    assert len(values) == 2 * q + 1
    assert torch.equal(values, levels.to(torch.float32))
    assert torch.equal(result.dequantized, (result.codes.double() * (clip / q)).float())
    assert result.codes.dtype == torch.int8 and int(result.zero_point) == 0
    assert float(result.scale) == pytest.approx(clip / q, rel=1e-15)
    # Zero stays exactly zero.
    assert float(clip_quantize_tensor(torch.zeros(3), bits, clip).dequantized.abs().max()) == 0.0


@pytest.mark.parametrize("bits", [8, 4])
def test_out_of_range_values_are_clipped_and_the_rest_rounded_to_the_nearest_level(bits):
    clip = 0.5
    step = clip / (2 ** (bits - 1) - 1)
    w = torch.tensor([-7.0, -0.5000001, -0.5, 0.0, 0.1234, 0.49, 0.5, 3.0, 1e6])
    deq = clip_quantize_tensor(w, bits, clip).dequantized.double()
    assert deq[0] == deq[1] == deq[2] == pytest.approx(-clip) and deq[-1] == deq[-2] == pytest.approx(clip)
    inside = w.abs() <= clip
    assert ((deq - w.double())[inside].abs() <= step / 2 + 1e-7).all()
    assert deq.abs().max() <= clip + 1e-7


def test_every_floating_tensor_is_quantized_one_dim_included():
    weights = mixed_state_dict()
    result = clip_quantize_state_dict(weights, bits=6, clip=1.0)
    assert list(result.dequantized) == list(weights)
    assert set(result.codes) == {"conv.weight", "linear.weight", "conv.bias", "norm.weight", "scalar"}
    assert torch.equal(result.dequantized["steps"], weights["steps"])
    assert torch.equal(result.dequantized["conv.bias"], torch.zeros(8))
    assert float(result.dequantized["scalar"]) == -1.0
    # GroupNorm scales above c are clipped to c: the range is fixed, whatever the tensor holds.
    norm = result.dequantized["norm.weight"]
    assert (weights["norm.weight"] > 1).any() and float(norm.max()) == 1.0
    assert len(torch.unique(norm)) < len(torch.unique(weights["norm.weight"]))
    for name, codes in result.codes.items():
        assert codes.shape == weights[name].shape and result.scales[name].shape == ()
        assert int(codes.abs().max()) <= 31


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("clip", [1.0, 0.3])
def test_requantizing_changes_nothing(bits, clip):
    first = clip_quantize_state_dict(mixed_state_dict(), bits, clip)
    second = clip_quantize_state_dict(first.dequantized, bits, clip)
    for name in first.codes:
        assert torch.equal(second.codes[name], first.codes[name]), name
        assert torch.equal(second.dequantized[name], first.dequantized[name]), name


@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, "wide", None])
def test_bad_clip_range_is_refused_with_the_fix(clip):
    with pytest.raises(PipelineError, match=r"clip range c must be a finite number > 0.*quantization: \{clip"):
        clip_quantize_state_dict(mixed_state_dict(), 8, clip)


def test_nonfinite_weights_are_refused():
    with pytest.raises(PipelineError, match="w: .*NaN"):
        clip_quantize_state_dict({"w": torch.tensor([1.0, math.inf])}, 8, 1.0)


# ------------------------------------------------------------------------------------------
# The config slice and the stage.

def test_clip_slice_goes_only_to_clip_jobs():
    config = load_config()
    assert config["quantization"]["clip"] == 1.0
    assert stage_settings(config, "quantize", precision="int8clip") == {"quantization": {"clip": 1.0}}
    # Min-max jobs depend on no config: editing clip must not rerun them (or their samples).
    assert stage_settings(config, "quantize", precision="int8") == {}
    assert stage_settings(config, "quantize", precision="int4pcasym") == {}
    config["quantization"]["clip"] = 0.25
    assert stage_settings(config, "quantize", precision="int4clip") == {"quantization": {"clip": 0.25}}
    with pytest.raises(PipelineError, match="unknown precision"):
        stage_settings(config, "quantize", precision="int8clipp")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(1)
    state = {name: 0.8 * torch.randn(t.shape, generator=g) for name, t in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "weights_ema.pt"
    save_torch(state, path)
    return str(path)


def test_stage_reads_clip_from_the_rule_slice_and_records_the_grid(tiny_weights, tmp_path):
    config = load_config()
    config["quantization"]["clip"] = 0.5
    slice_json = json.dumps(stage_settings(config, "quantize", precision="int4clip"))
    out, codes = tmp_path / "weights.pt", tmp_path / "codes.h5"
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int4clip", "--out", str(out),
                 "--codes", str(codes), "--settings", slice_json]) == 0
    original = torch.load(tiny_weights, weights_only=True)
    quantized = torch.load(out, weights_only=True)
    stored = read_codes(codes)
    assert set(stored) == set(original)                  # every tensor, biases and norms too
    for name, tensor in quantized.items():
        assert torch.equal(stored[name], tensor), name
        assert float(tensor.abs().max()) <= 0.5
    with h5py.File(codes, "r") as f:
        assert f.attrs["scheme"] == "clip" and f.attrs["precision"] == "int4clip" and f.attrs["bits"] == 4
        assert f.attrs["clip"] == 0.5 and f.attrs["clip_low"] == -0.5 and f.attrs["clip_high"] == 0.5
        assert f.attrs["step"] == pytest.approx(0.5 / 7) and f.attrs["num_levels"] == 15
        assert (f.attrs["code_min"], f.attrs["code_max"]) == (-7, 7)
        assert bool(f.attrs["include_1d"]) and json.loads(f.attrs["kept_fp32_json"]) == []
        np.testing.assert_allclose(f["levels"][...], np.arange(-7, 8) * 0.5 / 7, rtol=1e-15)
        levels = set(np.float32(f["levels"][...]).tolist())
    assert set(torch.cat([t.flatten() for t in quantized.values()]).tolist()) <= levels

    # --clip wins over the slice; min-max ignores both and says so in its attributes.
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int4clip", "--out", str(out),
                 "--codes", str(codes), "--settings", slice_json, "--clip", "2.0"]) == 0
    with h5py.File(codes, "r") as f:
        assert f.attrs["clip"] == 2.0
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int8", "--out", str(out),
                 "--codes", str(codes), "--settings", "{}"]) == 0
    with h5py.File(codes, "r") as f:
        assert f.attrs["scheme"] == "minmax" and "clip" not in f.attrs and "levels" not in f
    assert main(["quantize", "--weights", tiny_weights, "--precision", "int8clip", "--out", str(out),
                 "--codes", str(codes), "--settings", '{"quantization": {"clip": -1}}']) == 2
