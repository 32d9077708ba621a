"""Compute a reference's share of every KID bootstrap once, for all the fid jobs against it.

A fid job's KID replicates need three kernel means per replicate: within the samples, between
samples and reference, and within the reference. The last is the largest (r^2 kernel entries for
r reference rows: 3.8 s of a 15 s job at r = 10,000 on one core) and the same in every job, since
replicate b resamples the reference rows from (bootstrap seed, b) alone. This stage reads
fid_ref_{extractor}.h5 and writes kid_ref_{extractor}.h5 beside it: dataset "within" (1 + R,)
float64, entry 0 over all rows and entry 1 + b over replicate b's resample (R =
fid.bootstrap.kid_replicates), with the bootstrap seed, R and the reference's SHA-256. The fid
stage takes it with --kid-reference and gives the same numbers as without it.

Its own job rather than part of fid-reference: the bootstrap settings then never recompute the
reference's features (at paper scale, 50,000 Inception forwards).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipeline.arguments import add_config_arguments, nonnegative_int
from pipeline.fidelity.bootstrap import reference_within_terms, write_reference_within
from pipeline.fidelity.stats import h5_safe_attrs, read_reference
from pipeline.io.integrity import artifact_sha256
from pipeline.io.provenance import provenance
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)


def default_output(reference: str | Path) -> Path:
    """kid_ref_{extractor}.h5 beside fid_ref_{extractor}.h5."""
    reference = Path(reference)
    return reference.with_name(reference.name.replace("fid_ref_", "kid_ref_", 1))


def build_kid_reference(reference: str | Path, out: str | Path, replicates: int, seed: int,
                        settings: dict | None = None) -> Path:
    """Compute reference_within_terms of `reference`'s KID rows and write `out`."""
    start = time.time()
    reference = Path(reference)
    ref = read_reference(reference)
    within = reference_within_terms(ref.stats.kid_features, replicates, seed)
    attrs = provenance("kid-reference", settings or {})
    attrs.update({
        "bootstrap_seed": seed,
        "kid_replicates": replicates,
        "n_kid_rows": int(len(ref.stats.kid_features)),
        "extractor": ref.attrs["extractor"],
        "reference_path": str(reference),
        "reference_sha256": artifact_sha256(reference, "delete it and rerun fid-reference"),
        "wall_time_s": time.time() - start,
    })
    out = Path(out)
    write_reference_within(out, within, h5_safe_attrs(attrs))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="fid_ref_{extractor}.h5 from fid-reference")
    parser.add_argument("--out", default=None, help="output (default: kid_ref_{extractor}.h5 beside --reference)")
    add_config_arguments(parser, "the config's fid.bootstrap (pipeline.settings.KidReferenceSettings)",
                         reads="fid.bootstrap")
    parser.add_argument("--kid-replicates", type=nonnegative_int, default=None,
                        help="bootstrap replicates covered (default: fid.bootstrap.kid_replicates, else 0)")
    parser.add_argument("--bootstrap-seed", type=nonnegative_int, default=None,
                        help="seed of the bootstrap draws (default: fid.bootstrap.seed, else 0)")


def run(args: argparse.Namespace) -> None:
    fid, _ = read_settings(args, "kid_reference")
    boot = fid.get("bootstrap") or {}
    replicates = args.kid_replicates if args.kid_replicates is not None else boot.get("kid_replicates", 0)
    seed = args.bootstrap_seed if args.bootstrap_seed is not None else boot.get("seed", 0)
    out = Path(args.out or default_output(args.reference))
    settings = {"reference": str(args.reference), "kid_replicates": replicates, "bootstrap_seed": seed}
    start = time.time()
    build_kid_reference(args.reference, out, replicates, seed, settings)
    logger.info(f"kid-reference: wrote {out}: the reference's KID terms for {replicates} replicates "
                f"(seed {seed}) in {time.time() - start:.1f} s")
