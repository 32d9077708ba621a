"""Quantize a weights file to a precision variant (int8 by default): dequantized weights + codes.

Writes two files, each atomically:

* --out: a plain state_dict with the same keys, shapes and dtypes, holding the dequantized
  weights W_q = s * (codes - z). This is what `sample` and the metrics load.
* --codes: HDF5 with the low-bit model itself. For each quantized tensor a group
  `tensors/<state_dict key>` holds `codes` (int8, or uint8 when asymmetric, in the tensor's
  shape), `scale` (float64; a scalar per tensor, (C_out,) per channel) and `zero_point` (same
  dtype as the codes, shaped like scale). Root attributes: precision, scheme ("minmax" or
  "clip"), bits, include_1d, the input weights' path and SHA-256, the names of the tensors kept in
  fp32 (JSON), and provenance; min-max adds granularity and symmetric. Clip-and-round (intBclip)
  adds the range and grid: attributes clip (c), clip_low (-c), clip_high (c), step (c / Q),
  code_min (-Q), code_max (Q), num_levels (2Q + 1), levels ("W_q = k * step for integer k in
  [code_min, code_max]"), and a root dataset `levels` (float64, (2Q + 1,)) holding every value
  W_q can take. `read_codes` turns the file back into the exact --out tensors.

The clip range c of intBclip comes from --clip, else the config slice of --settings (what
the Snakemake rule passes: `quantization.clip`), else the --configfile files' quantization.clip
(merged over config.yaml), else 1.0. Min-max precisions read no config.

Precision "fp32" is accepted for completeness: --out becomes a byte copy of the input and
--codes an HDF5 file with an empty `tensors` group and precision "fp32". (The workflow uses the
trained weights directly for fp32 and never runs this stage for it.)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.arguments import add_config_arguments, positive_float
from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256
from pipeline.io import atomic_path, provenance, write_attrs
from pipeline.io.integrity import open_verified_h5, save_torch, sealed_h5
from pipeline.io.checkpoint import load_weights
from pipeline.precision import CLIP, MINMAX, precision_scheme
from pipeline.quant import (DEFAULT_CLIP, QuantizedStateDict, checked_clip, clip_levels, clip_quantize_state_dict,
                            clip_step, code_range, dequantize, parse_precision, quantize_state_dict)
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)


def quantize_file(weights: str | Path, precision: str, out: str | Path, codes: str | Path,
                  include_1d: bool = False, clip: float = DEFAULT_CLIP) -> QuantizedStateDict | None:
    """Quantize the state_dict in `weights` to `precision`; write `out` and `codes`.

    :param include_1d: min-max only; clip-and-round always quantizes 1-D tensors.
    :param clip: the range [-c, c] of intBclip precisions (ignored by the others).
    :return: the quantization result, or None for precision "fp32".
    """
    weights, out, codes = Path(weights), Path(out), Path(codes)
    spec = parse_precision(precision)
    scheme = precision_scheme(spec)
    if scheme == CLIP:
        clip, include_1d = checked_clip(clip), True
    state_dict = load_weights(weights)
    settings = {"precision": precision, "include_1d": include_1d, **(spec or {})}
    if scheme == CLIP:
        settings["clip"] = clip
    attrs = provenance("quantize", settings, precision=precision, input_weights=str(weights),
                       input_sha256=file_sha256(weights), include_1d=include_1d)

    if spec is None:
        with atomic_path(out) as tmp:
            shutil.copyfile(weights, tmp)
        write_codes(codes, None, attrs, kept=list(state_dict))
        return None

    levels = None
    if scheme == CLIP:
        result = clip_quantize_state_dict(state_dict, spec["bits"], clip)
        low, high = code_range(spec["bits"], symmetric=True)
        levels = clip_levels(spec["bits"], clip)
        attrs.update(scheme=CLIP, bits=spec["bits"], clip=clip, clip_low=-clip, clip_high=clip,
                     step=clip_step(spec["bits"], clip), code_min=low, code_max=high, num_levels=len(levels),
                     levels="W_q = k * step for integer k in [code_min, code_max]")
    else:
        result = quantize_state_dict(state_dict, include_1d=include_1d, **spec)
        attrs.update(scheme=MINMAX, bits=spec["bits"], granularity=spec["granularity"],
                     symmetric=spec["symmetric"])
    save_torch(result.dequantized, out)
    write_codes(codes, result, attrs, kept=[k for k in state_dict if k not in result.codes], levels=levels)
    return result


def write_codes(path: Path, result: QuantizedStateDict | None, attrs: dict, kept: list[str],
                levels: torch.Tensor | None = None) -> None:
    """The codes file described in the module docstring (no tensors when `result` is None).

    :param levels: (L,) every value W_q can take, stored as the root dataset `levels` when given.
    """
    with sealed_h5(path) as f:
        if levels is not None:
            f.create_dataset("levels", data=levels.cpu().numpy())
        group = f.create_group("tensors")
        if result is not None:
            for name, codes in result.codes.items():
                tensor_group = group.create_group(name)
                tensor_group.create_dataset("codes", data=codes.cpu().numpy(), compression="gzip",
                                            compression_opts=4)
                tensor_group.create_dataset("scale", data=result.scales[name].cpu().numpy())
                tensor_group.create_dataset("zero_point", data=result.zero_points[name].cpu().numpy())
                tensor_group.attrs["dtype"] = str(result.dequantized[name].dtype).removeprefix("torch.")
        attrs = {**attrs, "quantized_tensors": len(group), "kept_fp32_json": json.dumps(kept)}
        # str() because h5py cannot store str subclasses such as torch.__version__.
        write_attrs(f, {key: str(value) if isinstance(value, str) else value for key, value in attrs.items()})


def read_codes(path: str | Path) -> dict[str, torch.Tensor]:
    """The dequantized tensors stored in a codes file, bit-identical to the --out weights."""
    tensors = {}
    with open_verified_h5(path, "delete it and rerun the quantize rule") as f:
        for name, group in f["tensors"].items():
            dtype = getattr(torch, group.attrs["dtype"])
            tensors[name] = dequantize(torch.from_numpy(np.asarray(group["codes"])),
                                       torch.from_numpy(np.asarray(group["scale"])),
                                       torch.from_numpy(np.asarray(group["zero_point"])), dtype)
    return tensors


# ------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="input state_dict (.pt) from the train stage")
    parser.add_argument("--precision", default="int8",
                        help="fp32; intB[pc][asym] with B in 8, 6, 4 for min-max (pc = per output channel, "
                             "asym = asymmetric), e.g. int8, int4pc, int8asym; or intBclip for clip-and-round "
                             "on [-c, c], e.g. int8clip")
    parser.add_argument("--out", required=True, help="dequantized state_dict (.pt) to write")
    parser.add_argument("--codes", default=None,
                        help="HDF5 with the integer codes, scales and zero points; None = --out "
                             "with suffix .h5")
    parser.add_argument("--include-1d", action="store_true",
                        help="min-max: also quantize 1-D tensors (biases, GroupNorm parameters); "
                             "clip-and-round always does")
    parser.add_argument("--clip", type=positive_float, default=None,
                        help="range c of intBclip: weights are clipped to [-c, c] (default: the config's "
                             f"quantization.clip, else {DEFAULT_CLIP})")
    add_config_arguments(parser, "a config slice, {quantization: {clip: C}} or {} (pipeline.settings.QuantizeSettings)",
                         reads="quantization.clip is read from them")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    codes = Path(args.codes) if args.codes else out.with_suffix(".h5")
    if codes == out:
        raise PipelineError(f"--out and --codes are both {out}; give --out a .pt name or another --codes.")
    clip = DEFAULT_CLIP
    if precision_scheme(parse_precision(args.precision)) == CLIP:
        clip = resolve_clip(args)
    result = quantize_file(args.weights, args.precision, out, codes, include_1d=args.include_1d, clip=clip)
    count = 0 if result is None else len(result.codes)
    logger.info("quantize: %s: %d tensors quantized -> %s, %s", args.precision, count, out, codes)


def resolve_clip(args: argparse.Namespace) -> float:
    """c for intBclip: --clip, else quantization.clip of --settings or the config files, else DEFAULT_CLIP."""
    if args.clip is not None:
        return checked_clip(args.clip)
    config, _ = read_settings(args, "quantize", precision=args.precision)
    return checked_clip((config.get("quantization") or {}).get("clip", DEFAULT_CLIP))
