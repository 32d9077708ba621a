"""Post-training weight quantization: scale, round and clip fp32 weights to b-bit integer codes.

The paper quantizes "by clipping and rounding 32-bit parameters without fine-tuning" (SPEC 10).
The default here is its plainest reading, weight-only min-max quantization:

* symmetric, per tensor: Q = 2^(b-1) - 1, s = max|W| / Q, codes = clamp(round(W / s), -Q, Q),
  W_q = s * codes (zero point 0);
* asymmetric: the range [min(W, 0), max(W, 0)] (widened to hold 0, as torch's observers do, so the
  zero point is an integer code), s = (max - min) / (2^b - 1), z = round(-min / s),
  codes = clamp(round(W / s) + z, 0, 2^b - 1), W_q = s * (codes - z);
* per channel: the same with one (s, z) per output channel, i.e. per index of dim 0.

Every floating tensor of >= 2 dims is quantized (conv, linear, attention and embedding weights);
1-D tensors (biases, GroupNorm affine parameters) stay fp32 unless `include_1d`, and are then
always quantized per tensor. A tensor or channel that is all zero gets s = 1 and all-zero codes
instead of dividing by zero. Simulated quantization: the dequantized W_q is what the sampler runs.

Scales, divisions and rounding are done in float64 and W_q is rounded to the weight's dtype once.
For the symmetric quantizer this makes requantizing exactly idempotent: the element of largest
magnitude comes back bit-identical (fl32(fl64(m / Q) * Q) = m), so s, the codes and W_q repeat.
Asymmetric requantization gives the same codes, but W_q only to one float32 rounding, because its
range ends -s z and s (2^b - 1 - z) are themselves rounded before s is recomputed from them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import torch

from pipeline.errors import PipelineError

GRANULARITIES = ("per_tensor", "per_channel")
PRECISION_PATTERN = re.compile(r"int(?P<bits>8|6|4)(?P<per_channel>pc)?(?P<asym>asym)?")
PRECISION_FORMS = ("fp32 (no quantization), or intB[pc][asym] with B in 8, 6, 4: 'pc' quantizes per "
                   "output channel, 'asym' asymmetrically (e.g. int8, int4, int8pc, int6asym, int8pcasym)")


def parse_precision(name: str) -> dict[str, Any] | None:
    """Decode a precision name of the workflow: None for "fp32", else the quantizer's settings.

    "int8" -> {"bits": 8, "granularity": "per_tensor", "symmetric": True};
    "int4pcasym" -> {"bits": 4, "granularity": "per_channel", "symmetric": False}.
    Each variant has exactly one name, so artifact paths are unambiguous.
    """
    if name == "fp32":
        return None
    match = PRECISION_PATTERN.fullmatch(name)
    if match is None:
        raise PipelineError(f"unknown precision '{name}'; use {PRECISION_FORMS}.")
    return {"bits": int(match["bits"]),
            "granularity": "per_channel" if match["per_channel"] else "per_tensor",
            "symmetric": match["asym"] is None}


class QuantizedTensor(NamedTuple):
    """One quantized tensor.

    dequantized: W_q, same shape and dtype as the input.
    codes: integer codes, same shape (int8 for symmetric and uint8 for asymmetric up to 8 bits,
        int16 / int32 beyond).
    scale: float64, shape () per tensor or (C_out,) per channel.
    zero_point: the codes' dtype, shape like scale (all zero when symmetric).
    """

    dequantized: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


class QuantizedStateDict(NamedTuple):
    """Result of `quantize_state_dict`; the last three map only the quantized tensors' names."""

    dequantized: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    zero_points: dict[str, torch.Tensor]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code: [-(2^(b-1) - 1), 2^(b-1) - 1] or [0, 2^b - 1]."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """The narrowest integer dtype holding every code (and zero point)."""
    if symmetric:
        return torch.int8 if bits <= 8 else torch.int16
    return torch.uint8 if bits <= 8 else torch.int32


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_q = scale * (codes - zero_point), in float64, rounded once to `dtype`.

    :param codes: (C_out, ...) integer codes.
    :param scale: float64, () or (C_out,).
    :param zero_point: integer, shaped like scale.
    """
    scale = _broadcastable(scale.to(torch.float64), codes.ndim)
    zero_point = _broadcastable(zero_point.to(torch.float64), codes.ndim)
    return (scale * (codes.to(torch.float64) - zero_point)).to(dtype)


def quantize_tensor(weight: torch.Tensor, bits: int = 8, per_channel: bool = False,
                    symmetric: bool = True) -> QuantizedTensor:
    """Min-max quantize one floating tensor (see the module docstring for the formulas).

    :param weight: any floating tensor; per channel needs >= 1 dims and uses dim 0.
    :param bits: 2..16.
    :return: QuantizedTensor(dequantized, codes, scale, zero_point).
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if not weight.is_floating_point():
        raise ValueError(f"only floating tensors are quantized, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise PipelineError("a weight tensor holds NaN or infinite values; such weights cannot be "
                            "quantized (the training run diverged).")
    w = weight.detach().to(torch.float64)

    # Rows = what shares one scale: the whole tensor, or each output channel.
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    low, high = code_range(bits, symmetric)
    if symmetric:
        scale = rows.abs().amax(dim=1) / high
    else:
        lo = rows.amin(dim=1).clamp(max=0.0)
        hi = rows.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / high
    # An all-zero row gets scale 1, so all its codes equal the zero point (which is then 0).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.zeros_like(scale) if symmetric else torch.round(-lo / scale)
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())

    scale_b = _broadcastable(scale, w.ndim)
    zero_b = _broadcastable(zero_point, w.ndim)
    codes = torch.clamp(torch.round(w / scale_b) + zero_b, low, high)
    dtype = code_dtype(bits, symmetric)
    codes, zero_point = codes.to(dtype), zero_point.to(dtype)
    return QuantizedTensor(dequantize(codes, scale, zero_point, weight.dtype).to(weight.device),
                           codes, scale, zero_point)


def is_quantized_tensor(tensor: torch.Tensor, include_1d: bool = False) -> bool:
    """Which state_dict entries the quantizer touches: floating, >= 2 dims (or 1-D if asked)."""
    return tensor.is_floating_point() and (tensor.ndim >= 2 or (include_1d and tensor.ndim == 1))


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], bits: int = 8,
                        granularity: str = "per_tensor", symmetric: bool = True,
                        include_1d: bool = False) -> QuantizedStateDict:
    """Quantize every weight tensor of a state_dict; the others are copied unchanged.

    :param state_dict: name -> tensor (guided-diffusion names; order is kept).
    :param bits: code width b (the workflow uses 8, 6, 4).
    :param granularity: "per_tensor" or "per_channel" (one scale per index of dim 0; 1-D tensors,
        when included, are always per tensor).
    :param symmetric: symmetric codes in [-Q, Q] or asymmetric codes in [0, 2^b - 1].
    :param include_1d: also quantize 1-D tensors (biases, GroupNorm scale and shift).
    :return: QuantizedStateDict(dequantized state_dict, codes, scales, zero_points).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    result = QuantizedStateDict({}, {}, {}, {})
    for name, tensor in state_dict.items():
        if not is_quantized_tensor(tensor, include_1d):
            result.dequantized[name] = tensor.detach().clone()
            continue
        per_channel = granularity == "per_channel" and tensor.ndim >= 2
        try:
            quantized = quantize_tensor(tensor, bits, per_channel, symmetric)
        except PipelineError as err:
            raise PipelineError(f"{name}: {err}") from None
        result.dequantized[name] = quantized.dequantized
        result.codes[name] = quantized.codes
        result.scales[name] = quantized.scale
        result.zero_points[name] = quantized.zero_point
    return result


def _broadcastable(per_row: torch.Tensor, ndim: int) -> torch.Tensor:
    # () stays (); (C,) becomes (C, 1, ..., 1) to scale dim 0 of an ndim-D tensor.
    return per_row if per_row.ndim == 0 else per_row.reshape(-1, *([1] * (ndim - 1)))
