"""Precision names of the workflow ("fp32", "int8", "int4pc", "int6clip", ...) and what they mean.

A name is a path component and a Snakemake wildcard, so each quantizer variant has exactly one
name. Kept free of torch so the Snakefile can decode names while it parses.

* intB[pc][asym], B in 8, 6, 4: min-max quantization (pipeline.quant), per tensor or per output
  channel ("pc"), symmetric or asymmetric ("asym"); the default meaning of int8 / int6 / int4.
* intBclip: clip-and-round on a fixed range [-c, c] shared by every tensor (c from the config's
  `quantization.clip`); see pipeline.quant.clip_quantize_tensor for the grid.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import PipelineError

MINMAX = "minmax"
CLIP = "clip"
# Without the fp32 alternative: the names the quantize stage writes files for.
QUANTIZED_REGEX = r"int(8|6|4)(clip|(pc)?(asym)?)"
PRECISION_REGEX = rf"fp32|{QUANTIZED_REGEX}"
PRECISION_PATTERN = re.compile(
    r"int(?P<bits>8|6|4)(?:(?P<clip>clip)|(?P<per_channel>pc)?(?P<asym>asym)?)")
PRECISION_FORMS = ("fp32 (no quantization); intB[pc][asym] with B in 8, 6, 4 for min-max quantization: 'pc' "
                   "per output channel, 'asym' asymmetric (e.g. int8, int4, int8pc, int6asym, int8pcasym); "
                   "or intBclip for clip-and-round on the fixed range [-c, c] (e.g. int8clip, int4clip)")


def parse_precision(name: str) -> dict[str, Any] | None:
    """Decode a precision name: None for "fp32", else the quantizer's settings.

    Min-max names give the keyword arguments of pipeline.quant.quantize_state_dict, as always:
    "int8" -> {"bits": 8, "granularity": "per_tensor", "symmetric": True};
    "int4pcasym" -> {"bits": 4, "granularity": "per_channel", "symmetric": False}.
    Clip names carry their scheme: "int6clip" -> {"scheme": "clip", "bits": 6}.
    """
    if name == "fp32":
        return None
    match = PRECISION_PATTERN.fullmatch(name)
    if match is None:
        raise PipelineError(f"unknown precision '{name}'; use {PRECISION_FORMS}.")
    if match["clip"]:
        return {"scheme": CLIP, "bits": int(match["bits"])}
    return {"bits": int(match["bits"]),
            "granularity": "per_channel" if match["per_channel"] else "per_tensor",
            "symmetric": match["asym"] is None}


def precision_scheme(spec: dict[str, Any] | None) -> str | None:
    """"minmax" or "clip" for a parse_precision result (None for fp32)."""
    if spec is None:
        return None
    return spec.get("scheme", MINMAX)
