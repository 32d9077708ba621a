"""Quantize a weights file to a precision variant (int8 by default): dequantized weights + codes.

Writes two files, each atomically:

* --out: a plain state_dict with the same keys, shapes and dtypes, holding the dequantized
  weights W_q = s * (codes - z). This is what `sample` and the metrics load.
* --codes: HDF5 with the low-bit model itself. For each quantized tensor a group
  `tensors/<state_dict key>` holds `codes` (int8, or uint8 when asymmetric, in the tensor's
  shape), `scale` (float64; a scalar per tensor, (C_out,) per channel) and `zero_point` (same
  dtype as the codes, shaped like scale). Root attributes: precision, bits, granularity,
  symmetric, include_1d, the input weights' path and SHA-256, the names of the tensors kept in
  fp32 (JSON), and provenance. `read_codes` turns the file back into the exact --out tensors.

Precision "fp32" is accepted for completeness: --out becomes a byte copy of the input and
--codes an HDF5 file with an empty `tensors` group and precision "fp32". (The workflow uses the
trained weights directly for fp32 and never runs this stage for it.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256
from pipeline.io import atomic_path, atomic_torch_save, provenance, write_attrs
from pipeline.io.checkpoint import load_weights
from pipeline.quant import QuantizedStateDict, dequantize, parse_precision, quantize_state_dict


def quantize_file(weights: str | Path, precision: str, out: str | Path, codes: str | Path,
                  include_1d: bool = False) -> QuantizedStateDict | None:
    """Quantize the state_dict in `weights` to `precision`; write `out` and `codes`.

    :return: the quantization result, or None for precision "fp32".
    """
    weights, out, codes = Path(weights), Path(out), Path(codes)
    spec = parse_precision(precision)
    state_dict = load_weights(weights)
    settings = {"precision": precision, "include_1d": include_1d, **(spec or {})}
    attrs = provenance("quantize", settings, precision=precision, input_weights=str(weights),
                       input_sha256=file_sha256(weights), include_1d=include_1d)

    if spec is None:
        with atomic_path(out) as tmp:
            shutil.copyfile(weights, tmp)
        write_codes(codes, None, attrs, kept=list(state_dict))
        return None

    result = quantize_state_dict(state_dict, include_1d=include_1d, **spec)
    attrs.update(bits=spec["bits"], granularity=spec["granularity"], symmetric=spec["symmetric"])
    atomic_torch_save(result.dequantized, out)
    write_codes(codes, result, attrs, kept=[k for k in state_dict if k not in result.codes])
    return result


def write_codes(path: Path, result: QuantizedStateDict | None, attrs: dict, kept: list[str]) -> None:
    """The codes file described in the module docstring (no tensors when `result` is None)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
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
    with h5py.File(path, "r") as f:
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
                        help="fp32, or intB[pc][asym] with B in 8, 6, 4 (pc = per output channel, "
                             "asym = asymmetric), e.g. int8, int4pc, int8asym")
    parser.add_argument("--out", required=True, help="dequantized state_dict (.pt) to write")
    parser.add_argument("--codes", default=None,
                        help="HDF5 with the integer codes, scales and zero points; None = --out "
                             "with suffix .h5")
    parser.add_argument("--include-1d", action="store_true",
                        help="also quantize 1-D tensors (biases, GroupNorm parameters)")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    codes = Path(args.codes) if args.codes else out.with_suffix(".h5")
    if codes == out:
        raise PipelineError(f"--out and --codes are both {out}; give --out a .pt name or another --codes.")
    result = quantize_file(args.weights, args.precision, out, codes, include_1d=args.include_1d)
    count = 0 if result is None else len(result.codes)
    print(f"quantize: {args.precision}: {count} tensors quantized -> {out}, {codes}", file=sys.stderr)
