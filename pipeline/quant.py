"""Post-training weight quantization: scale, round and clip fp32 weights to b-bit integer codes.

The paper quantizes "by clipping and rounding 32-bit parameters without fine-tuning" (SPEC 10).
Two schemes; precision names (pipeline.precision) choose between them.

Min-max, the default meaning of int8 / int6 / int4, is weight-only quantization whose range
follows each tensor:

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

Clip-and-round (intBclip) is the literal reading: one fixed range [-c, c] for every floating tensor
(1-D ones included), so the grid cannot adapt to, and flatter, a model's weight scale. See
`clip_quantize_tensor`.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import torch

from pipeline.errors import PipelineError
# Re-exported: the names were defined here before they moved to the torch-free module.
from pipeline.precision import PRECISION_FORMS, PRECISION_PATTERN, parse_precision  # noqa: F401

GRANULARITIES = ("per_tensor", "per_channel")
# The clip range c of intBclip when the config does not set quantization.clip.
DEFAULT_CLIP = 1.0


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


def checked_clip(clip: float) -> float:
    """`clip` as a float, or a PipelineError when it is not a finite number > 0."""
    try:
        value = float(clip)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise PipelineError(f"the clip range c must be a finite number > 0, got {clip!r}; set "
                            f"quantization: {{clip: {DEFAULT_CLIP}}} in the config or pass --clip.")
    return value


def clip_step(bits: int, clip: float) -> float:
    """Spacing of the clip-and-round grid: c / (2^(b-1) - 1)."""
    return checked_clip(clip) / code_range(bits, symmetric=True)[1]


def clip_levels(bits: int, clip: float) -> torch.Tensor:
    """The 2^b - 1 values W_q can take, float64 (2^b - 1,): k * c / Q for k = -Q..Q, Q = 2^(b-1) - 1."""
    low, high = code_range(bits, symmetric=True)
    return torch.arange(low, high + 1, dtype=torch.float64) * clip_step(bits, clip)


def clip_quantize_tensor(weight: torch.Tensor, bits: int = 8, clip: float = DEFAULT_CLIP) -> QuantizedTensor:
    """Clip `weight` to [-c, c] and round it to the nearest of 2^b - 1 levels, 0 among them.

    Grid: step s = c / Q with Q = 2^(b-1) - 1, levels k s for integer k in [-Q, Q] (so -c, 0 and c
    are levels); codes = clamp(round(clamp(W, -c, c) / s), -Q, Q), W_q = s * codes, ties to even.
    A symmetric grid with 0 on it, rather than 2^b levels -c + k 2c / (2^b - 1): that grid has no
    0, so every weight that is exactly 0 (zero-initialised biases and shifts, untouched
    parameters) would move by half a step, and the one level it gains does not pay for that. The
    codes, scale and zero point (0) then have the same layout as symmetric min-max (int8 codes,
    float64 scalar scale), only with s fixed by c instead of by max|W|.

    Computed in float64 and rounded once to the weight's dtype; requantizing is exactly idempotent
    (|W_q / s - k| <= Q * 2^-24 is far below 1/2, so the codes repeat).

    :param weight: any floating tensor, any shape (0-D and 1-D included).
    :param bits: 2..16.
    :param clip: c > 0, finite.
    :return: QuantizedTensor(dequantized (weight's shape and dtype), codes (same shape), scale (),
        zero_point ()).
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if not weight.is_floating_point():
        raise ValueError(f"only floating tensors are quantized, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise PipelineError("a weight tensor holds NaN or infinite values; such weights cannot be "
                            "quantized (the training run diverged).")
    clip = checked_clip(clip)
    low, high = code_range(bits, symmetric=True)
    scale = torch.tensor(clip_step(bits, clip), dtype=torch.float64)
    w = weight.detach().to(torch.float64).clamp(-clip, clip)
    # Clamping the codes too guards against c / s landing a rounding error above Q.
    codes = torch.clamp(torch.round(w / scale), low, high).to(code_dtype(bits, symmetric=True))
    zero_point = torch.zeros((), dtype=codes.dtype)
    return QuantizedTensor(dequantize(codes, scale, zero_point, weight.dtype).to(weight.device),
                           codes, scale, zero_point)


def clip_quantize_state_dict(state_dict: Mapping[str, torch.Tensor], bits: int = 8,
                             clip: float = DEFAULT_CLIP) -> QuantizedStateDict:
    """Clip-and-round every floating tensor of a state_dict (1-D and 0-D too); others are copied.

    :param state_dict: name -> tensor (order is kept).
    :param bits: code width b (the workflow uses 8, 6, 4).
    :param clip: the range [-c, c] shared by every tensor.
    :return: QuantizedStateDict(dequantized state_dict, codes, scales (all c / Q), zero_points (0)).
    """
    clip = checked_clip(clip)
    result = QuantizedStateDict({}, {}, {}, {})
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            result.dequantized[name] = tensor.detach().clone()
            continue
        try:
            quantized = clip_quantize_tensor(tensor, bits, clip)
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
