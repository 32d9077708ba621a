"""Fréchet distance (FID or FD-EffNetLite0) and KID of samples against cached reference statistics.

Reads samples.h5 ("images", uint8 N x H x W x C) and a fid_ref_{extractor}.h5 written by
`fid-reference`, extracts the samples' features with the same extractor through torch-fidelity
(on the GPU when torch sees one), and writes fid_{extractor}.h5 (or --out) whose attributes
hold metric_name ("FID" only for Inception, "FD-EffNetLite0" for the offline proxy), value,
kid_value (the unbiased KID on all kid rows), the extractor, the weights' SHA-256, N and the
torch-fidelity version, with the samples' provenance; with --kid-subsets > 0 also kid_mean and
kid_std, torch-fidelity's KID over random subsets (same expectation, larger variance, and a third
of the job's time at N = 2,000, so off by default).

Paired bootstrap (config fid.bootstrap; pipeline.fidelity.bootstrap): datasets fd_replicates
(B_fd,) and kid_replicates (B_kid,), one value per replicate, and the point KID on all rows with
the replicates' estimator (attr kid_value). Replicate b resamples the same positions in every fid
file of the same N, seed and reference, so replicate b of model A minus replicate b of model B is
a replicate of the paired difference. FD replicates resample the samples only (reference moments
fixed: reference-set variation is left out, common to all models, cancelling to first order in
paired differences); KID replicates resample samples and reference rows (included).

It refuses to compare when the weights now in use differ from the reference's (by SHA-256) or
when the samples' size or channels differ from the reference images'.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch_fidelity

from pipeline.arguments import add_config_arguments, int_at_least, nonnegative_int, positive_int
from pipeline.errors import PipelineError
from pipeline.fidelity.bootstrap import fd_replicates, kid_replicates, read_reference_within
from pipeline.fidelity.extractors import resolve_extractor
from pipeline.fidelity.stats import (DEFAULT_KID_ROWS, H5Images, feature_statistics, frechet_distance,
                                     h5_attrs, h5_safe_attrs, image_shape, kernel_distance,
                                     read_reference)
from pipeline.io.integrity import artifact_sha256, sealed_h5
from pipeline.io.provenance import provenance, stable_attrs, write_attrs
from pipeline.progress import Progress
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)


def evaluate(samples: str | Path, reference: str | Path, out: str | Path | None = None, *,
             inception_weights: str | Path | None = None, max_samples: int | None = None,
             kid_rows: int = DEFAULT_KID_ROWS, kid_subsets: int = 0, kid_subset_size: int = 1000,
             batch_size: int = 64, seed: int = 0, progress: bool = False,
             fd_bootstrap: int = 0, kid_bootstrap: int = 0, bootstrap_seed: int = 0,
             kid_reference: str | Path | None = None,
             settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compute FD and KID of `samples` against `reference`, write `out`, return its attributes.

    fd_bootstrap / kid_bootstrap: paired bootstrap replicates of FD and KID (0 = none), drawn
    from bootstrap_seed; kid_reference: the reference's share of the KID replicates, from
    `kid-reference` (the same numbers, computed once per reference). kid_subsets > 0 adds
    torch-fidelity's subset KID (kid_mean, kid_std). `out` defaults to fid_{extractor}.h5 beside
    the samples; the returned mapping also holds the path written under "out" (the replicate arrays
    are in the file only).
    """
    start = time.time()
    samples, reference = Path(samples), Path(reference)
    ref = read_reference(reference)
    name = ref.attrs["extractor"]
    source = H5Images(samples)
    _, height, width, channels = image_shape(source)

    # The same extractor with the same weights, or the distance would be meaningless.
    extractor = resolve_extractor(name, inception_weights=inception_weights)
    if extractor.weights_sha256 != ref.attrs["weights_sha256"]:
        raise PipelineError(
            f"the {name} weights in use ({extractor.weights_path}, sha256 {extractor.weights_sha256}) "
            f"differ from those of the reference {reference} (sha256 {ref.attrs['weights_sha256']}, "
            f"file {ref.attrs.get('weights_path', '?')}); pass the reference's weights with "
            f"--inception-weights or recompute the reference.")

    # The reference's KID terms must be this reference's and this bootstrap's: checked before any work.
    reference_sha256 = artifact_sha256(reference, "delete it and rerun fid-reference")
    within = (None if kid_reference is None else
              read_reference_within(kid_reference, reference_sha256, kid_bootstrap, bootstrap_seed))

    expected = (ref.attrs["image_height"], ref.attrs["image_width"], ref.attrs["image_channels"])
    if (height, width, channels) != tuple(expected):
        raise PipelineError(f"samples {samples} are {height}x{width}x{channels} but the reference images "
                            f"are {expected[0]}x{expected[1]}x{expected[2]}; compare samples with the "
                            f"reference of their own dataset.")

    stats = feature_statistics(source, extractor, max_images=max_samples, kid_rows=kid_rows,
                               batch_size=batch_size, seed=seed, progress=progress,
                               keep_features=fd_bootstrap > 0)
    if stats.feature_dim != ref.stats.feature_dim:
        raise PipelineError(f"samples give {stats.feature_dim}-d features but the reference holds "
                            f"{ref.stats.feature_dim}-d ones.")
    value = frechet_distance(stats.mu, stats.sigma, ref.stats.mu, ref.stats.sigma)
    subset_kid = {}
    if kid_subsets:
        kid_mean, kid_std, subset_size = kernel_distance(stats.kid_features, ref.stats.kid_features,
                                                         subsets=kid_subsets, subset_size=kid_subset_size,
                                                         seed=seed)
        subset_kid = {"kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": subset_size}
    fd_reps = np.empty(0)
    if fd_bootstrap:
        with Progress(logger, f"fid {extractor.metric_name} bootstrap", fd_bootstrap, "replicates",
                      bar=progress) as bar:
            fd_reps = fd_replicates(stats.features, ref.stats.mu, ref.stats.sigma, ref.sigma_sqrt,
                                    fd_bootstrap, bootstrap_seed, on_replicate=bar.update)
    kid_value, kid_reps = kid_replicates(stats.kid_features, ref.stats.kid_features, kid_bootstrap,
                                         bootstrap_seed, reference_within=within)

    numbers = {"FD": value, "KID value": kid_value, "FD bootstrap replicates": fd_reps,
               "KID bootstrap replicates": kid_reps,
               **{label: subset_kid[key] for key, label in (("kid_mean", "KID mean"), ("kid_std", "KID std"))
                  if key in subset_kid}}
    for label, number in numbers.items():
        if not np.isfinite(number).all():
            raise PipelineError(f"fid: the {label} of {samples} against {reference} is not finite, so "
                                f"nothing is written; the features hold NaN or inf: check both files.")
    attrs = provenance("fid", settings or {})
    attrs.update({
        "metric_name": extractor.metric_name,
        "value": value,
        "kid_subsets": kid_subsets,
        **subset_kid,
        "kid_value": kid_value,
        "kid_value_estimator": "unbiased MMD^2, kernel (x.y/D + 1)^3, all kid rows of both sides",
        "bootstrap_seed": bootstrap_seed,
        "bootstrap_fd_replicates": int(fd_reps.size),
        "bootstrap_kid_replicates": int(kid_reps.size),
        "bootstrap_fd_sample_rows": stats.n,
        "bootstrap_kid_sample_rows": int(len(stats.kid_features)),
        "bootstrap_kid_reference_rows": int(len(ref.stats.kid_features)),
        "bootstrap_fd_resampled": "samples only; reference moments fixed, so reference-set variation "
                                  "is left out (common to all models, cancels to first order in "
                                  "paired differences)",
        "bootstrap_kid_resampled": "samples and reference kid rows; reference-set variation included; "
                                   "within-set means skip pairs of a row with itself",
        "bootstrap_pairing": "replicate b draws positions from numpy default_rng(SeedSequence("
                             "[bootstrap_seed, b, *stream.encode()])), stream 'samples' or 'reference': "
                             "files with equal seed and row counts share every replicate's positions",
        "extractor": extractor.name,
        "fidelity_extractor": extractor.fidelity_name,
        "feature_layer": extractor.feature_layer,
        "feature_dim": stats.feature_dim,
        "weights_path": str(extractor.weights_path) if extractor.weights_path else "",
        "weights_sha256": extractor.weights_sha256,
        "n_samples": stats.n,
        "n_reference": ref.stats.n,
        "seed": seed,
        "torch_fidelity_version": torch_fidelity.__version__,
        "samples_path": str(samples),
        "samples_sha256": artifact_sha256(samples, "delete it and rerun the sample rule"),
        "samples_attrs_json": json.dumps(stable_attrs(h5_attrs(samples)), sort_keys=True, default=str),
        "reference_path": str(reference),
        "reference_sha256": reference_sha256,
        "reference_data_sha256": ref.attrs.get("data_sha256", ""),
        "wall_time_s": time.time() - start,
    })
    out = Path(out or samples.parent / f"fid_{extractor.name}.h5")
    with sealed_h5(out) as f:
        f.create_dataset("fd_replicates", data=fd_reps)
        f.create_dataset("kid_replicates", data=kid_reps)
        write_attrs(f, h5_safe_attrs(attrs))
    return {**attrs, "out": str(out)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="samples.h5 with uint8 'images' (N, H, W, C)")
    parser.add_argument("--reference", required=True, help="fid_ref_{extractor}.h5 from fid-reference")
    parser.add_argument("--out", default=None, help="output (default: fid_{extractor}.h5 beside --samples)")
    parser.add_argument("--kid-reference", default=None,
                        help="kid_ref_{extractor}.h5 from kid-reference: the reference's KID bootstrap terms, "
                             "computed once instead of in every job (same numbers)")
    add_config_arguments(parser, "the config's fid: entries (pipeline.settings.FidSettings)", reads="fid")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="Inception weights file (default: fid.inception_weights, then the torch "
                             "hub cache, then a download); must match the reference's")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="use a seeded random subset of at most this many samples (default: all)")
    parser.add_argument("--kid-rows", type=int_at_least(2), default=None,
                        help=f"features of at most this many samples are kept for KID "
                             f"(default: fid.kid_rows, else {DEFAULT_KID_ROWS})")
    parser.add_argument("--kid-subsets", type=nonnegative_int, default=None,
                        help="torch-fidelity's subset KID: random subsets drawn (default: fid.kid_subsets, "
                             "else 0 = not computed; the report reads the unbiased KID on all rows)")
    parser.add_argument("--kid-subset-size", type=int_at_least(2), default=None,
                        help="rows per subset, capped at the smaller side (default: fid.kid_subset_size, "
                             "else 1000)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per extractor forward (default: fid.batch_size, else 64)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the subsets (samples and KID)")
    parser.add_argument("--fd-replicates", type=nonnegative_int, default=None,
                        help="paired bootstrap replicates of FD (default: fid.bootstrap.fd_replicates, "
                             "else 0 = none)")
    parser.add_argument("--kid-replicates", type=nonnegative_int, default=None,
                        help="paired bootstrap replicates of KID (default: fid.bootstrap.kid_replicates, "
                             "else 0 = none)")
    parser.add_argument("--bootstrap-seed", type=nonnegative_int, default=None,
                        help="seed of the bootstrap draws (default: fid.bootstrap.seed, else 0)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


def run(args: argparse.Namespace) -> None:
    fid, _ = read_settings(args, "fid")
    batch_size = args.batch_size if args.batch_size is not None else fid.get("batch_size") or 64
    kid_rows = args.kid_rows if args.kid_rows is not None else fid.get("kid_rows") or DEFAULT_KID_ROWS
    boot = fid.get("bootstrap") or {}
    fd_bootstrap = args.fd_replicates if args.fd_replicates is not None else boot.get("fd_replicates", 0)
    kid_bootstrap = args.kid_replicates if args.kid_replicates is not None else boot.get("kid_replicates", 0)
    bootstrap_seed = args.bootstrap_seed if args.bootstrap_seed is not None else boot.get("seed", 0)
    kid_subsets = args.kid_subsets if args.kid_subsets is not None else fid.get("kid_subsets", 0)
    kid_subset_size = (args.kid_subset_size if args.kid_subset_size is not None
                       else fid.get("kid_subset_size", 1000))
    lower_bounds = {"max-samples": (args.max_samples, 2), "kid-rows": (kid_rows, 2),
                    "kid-subsets": (kid_subsets, 0), "kid-subset-size": (kid_subset_size, 2),
                    "batch-size": (batch_size, 1), "fd-replicates": (fd_bootstrap, 0),
                    "kid-replicates": (kid_bootstrap, 0)}
    for flag, (value, least) in lower_bounds.items():
        if value is not None and value < least:
            raise PipelineError(f"--{flag} is {value}; it must be at least {least}.")
    samples = Path(args.samples)
    weights = args.inception_weights or fid.get("inception_weights")
    settings = {"samples": str(samples), "reference": str(args.reference), "kid_reference": args.kid_reference,
                "inception_weights": weights,
                "max_samples": args.max_samples, "kid_rows": kid_rows,
                "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                "batch_size": batch_size, "seed": args.seed, "fd_replicates": fd_bootstrap,
                "kid_replicates": kid_bootstrap, "bootstrap_seed": bootstrap_seed}
    attrs = evaluate(samples, args.reference, args.out, inception_weights=weights,
                     max_samples=args.max_samples, kid_rows=kid_rows,
                     fd_bootstrap=fd_bootstrap, kid_bootstrap=kid_bootstrap, bootstrap_seed=bootstrap_seed,
                     kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                     batch_size=batch_size, seed=args.seed, progress=not args.no_progress,
                     kid_reference=args.kid_reference, settings=settings)
    logger.info(f"fid: wrote {attrs['out']}: {attrs['metric_name']} = {attrs['value']:.4f}, KID = "
                f"{attrs['kid_value']:.5f} (N = {attrs['n_samples']}, {attrs['extractor']})")
