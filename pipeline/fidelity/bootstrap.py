"""Paired bootstrap replicates of the Fréchet distance and of KID.

Pairing: every model's sample i starts from the same x_T and every model of a dataset is compared
with one reference set, so replicate b of each fid file must resample the same positions.
Replicate b draws its positions from numpy Generators seeded by (seed, b, "samples") and
(seed, b, "reference") (`resample_positions`), never from a shared stream, so the index sets
depend on (seed, b, set size) only. Replicate b of model A minus replicate b of model B is then a
replicate of the paired difference A - B.

FD replicates resample the samples only; the reference moments stay fixed, because a matrix
square root of the reference covariance per replicate is too slow on a CPU. Their intervals
therefore leave reference-set variation out; it is common to every model and cancels to first
order in paired differences, so it matters for an absolute FD interval, not for a comparison.

KID replicates resample both the samples' and the reference's feature rows, so their intervals
include reference-set variation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io.integrity import open_verified_h5, sealed_h5
from pipeline.io.provenance import write_attrs

SAMPLES = "samples"
REFERENCE = "reference"
# Rows of the first kernel operand per block: bounds the kernel block (rows x other side) in memory.
KERNEL_BLOCK_ROWS = 1024


def resample_positions(n: int, seed: int, replicate: int, stream: str) -> np.ndarray:
    """(n,) int64 positions in [0, n), drawn with replacement for replicate `replicate`.

    The generator is seeded by (seed, replicate, stream's bytes), so the draw depends on nothing
    else: two files of the same n and seed share every replicate's positions.
    """
    sequence = np.random.SeedSequence([int(seed), int(replicate), *stream.encode()])
    return np.random.default_rng(sequence).integers(0, n, size=n, dtype=np.int64)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root R (D, D) of a symmetric PSD matrix (D, D): R @ R = sigma.

    Eigenvalues below 0 (rounding of a singular covariance) are clipped to 0.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(z: np.ndarray) -> float:
    """tr (Sigma_ref^1/2 S Sigma_ref^1/2)^1/2 = tr (S Sigma_ref)^1/2 from z = X R (n, D).

    S is the covariance (ddof 1) of the rows X; the eigenvalues of Zc^T Zc / (n - 1) are found from
    whichever of Zc^T Zc (D, D) and Zc Zc^T (n, n) is smaller (same nonzero eigenvalues).
    """
    n = z.shape[0]
    centred = z - z.mean(axis=0)
    gram = centred.T @ centred if n >= z.shape[1] else centred @ centred.T
    eigenvalues = np.linalg.eigvalsh(gram / (n - 1))
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def fd_replicates(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                  ref_sigma_sqrt: np.ndarray, replicates: int, seed: int,
                  on_replicate: Callable[[int], None] | None = None) -> np.ndarray:
    """FD of `replicates` resamples of the sample rows against fixed reference moments.

    features: (n, D) sample features in sample order; ref_mu (D,), ref_sigma (D, D) and
    ref_sigma_sqrt = psd_sqrt(ref_sigma) (D, D). Returns float64 (replicates,):
    FD_b = |mu_b - mu_r|^2 + tr S_b + tr Sigma_r - 2 tr (S_b Sigma_r)^1/2 on rows
    resample_positions(n, seed, b, "samples"). Cost per replicate: one eigvalsh of size
    min(n, D) plus an (n, D) copy. `on_replicate(1)` is called after each (progress).
    """
    x = np.asarray(features, dtype=np.float64)
    n, dim = x.shape
    if n < 2:
        raise PipelineError(f"an FD bootstrap needs at least 2 sample rows; got {n}.")
    if ref_mu.shape != (dim,) or ref_sigma_sqrt.shape != (dim, dim):
        raise PipelineError(f"sample features are {dim}-d but the reference moments are "
                            f"{ref_mu.shape[0]}-d; compare with the reference of the same extractor.")
    # Centring on the full-data mean keeps the later sums free of a large common offset.
    offset = x.mean(axis=0)
    x = x - offset
    z = x @ ref_sigma_sqrt
    shift = offset - ref_mu
    trace_ref = float(np.trace(ref_sigma))
    out = np.empty(replicates)
    for b in range(replicates):
        rows = resample_positions(n, seed, b, SAMPLES)
        xb = x[rows]
        mean_b = xb.mean(axis=0)
        trace_b = float(((xb - mean_b) ** 2).sum()) / (n - 1)
        out[b] = (float(((mean_b + shift) ** 2).sum()) + trace_b + trace_ref
                  - 2.0 * trace_sqrt_product(z[rows]))
        if on_replicate is not None:
            on_replicate(1)
    return out


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / D + 1)^3 for rows of a (m, D) and b (r, D) -> (m, r), torch-fidelity's KID kernel."""
    kernel = a @ b.T
    kernel /= a.shape[1]
    kernel += 1.0
    # Two multiplications instead of `** 3`, which numpy evaluates by pow() per element (1.8x slower).
    cube = kernel * kernel
    cube *= kernel
    return cube


def _quadratic_forms(left: np.ndarray, right: np.ndarray, left_weights: np.ndarray,
                     right_weights: np.ndarray, kernel: Callable[[np.ndarray, np.ndarray], np.ndarray]
                     ) -> np.ndarray:
    """(W,) values w_l^T K(left, right) w_r for every weight row, the kernel built block by block.

    left (m, D), right (r, D), left_weights (W, m), right_weights (W, r).
    """
    total = np.zeros(left_weights.shape[0])
    for start in range(0, left.shape[0], KERNEL_BLOCK_ROWS):
        stop = start + KERNEL_BLOCK_ROWS
        block = kernel(left[start:stop], right)
        total += ((left_weights[:, start:stop] @ block) * right_weights).sum(axis=1)
    return total


def _counts(n: int, seed: int, replicates: int, stream: str) -> np.ndarray:
    """(1 + replicates, n) multiplicities: row 0 is the full data (all ones), row 1 + b replicate b."""
    counts = np.ones((1 + replicates, n))
    for b in range(replicates):
        counts[1 + b] = np.bincount(resample_positions(n, seed, b, stream), minlength=n)
    return counts


def _symmetric_quadratic_forms(features: np.ndarray, weights: np.ndarray, block_rows: int = KERNEL_BLOCK_ROWS
                               ) -> np.ndarray:
    """(W,) values w^T K(features, features) w for every weight row w of weights (W, m).

    K is symmetric, so only the blocks on and right of the diagonal are built, and each block
    right of it counts twice: half the kernel arithmetic of building all of K.
    """
    m = features.shape[0]
    total = np.zeros(weights.shape[0])
    for start in range(0, m, block_rows):
        stop = min(start + block_rows, m)
        block = polynomial_kernel(features[start:stop], features[start:])  # (stop - start, m - start)
        partial = weights[:, start:stop] @ block
        own = stop - start
        total += (partial[:, :own] * weights[:, start:stop]).sum(axis=1)
        total += 2.0 * (partial[:, own:] * weights[:, stop:]).sum(axis=1)
    return total


def _within_term(features: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of k(x_i, x_j) over pairs of distinct rows i != j of each resample, (W,).

    A row drawn c_i times stands at c_i positions. Dropping only the c_i diagonal positions would
    keep c_i (c_i - 1) pairs of a row with itself, and k(x, x) exceeds a typical k(x, y): the
    replicates would sit about 1/m * (E k(x,x) - E k(x,y)) above the estimate (2.4 replicate
    standard deviations at m = 200 in a check). So every pair of a row with itself is dropped:
    (c^T K c - sum_i c_i^2 k(x_i, x_i)) / (m^2 - sum_i c_i^2), which for c = 1 is the usual
    unbiased off-diagonal mean (sum K - tr K) / (m (m - 1)).
    """
    diagonal = ((features ** 2).sum(axis=1) / features.shape[1] + 1.0) ** 3
    total = _symmetric_quadratic_forms(features, counts)
    squared = counts ** 2
    return (total - squared @ diagonal) / (counts.sum(axis=1) ** 2 - squared.sum(axis=1))


def reference_within_terms(reference_features: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """The reference's within-set kernel means of kid_replicates, (1 + replicates,) float64.

    Entry 0 is the mean over all rows, entry 1 + b that of replicate b's resample. They depend on
    the reference rows, the seed and b only, so every fid job against one reference shares them;
    the kid-reference stage computes them once (the largest kernel of an FD job: r^2 entries).
    """
    y = np.asarray(reference_features, dtype=np.float64)
    if y.shape[0] < 2:
        raise PipelineError(f"KID needs at least 2 reference feature rows; got {y.shape[0]}.")
    return _within_term(y, _counts(y.shape[0], seed, replicates, REFERENCE))


def kid_replicates(sample_features: np.ndarray, reference_features: np.ndarray, replicates: int,
                   seed: int, reference_within: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Unbiased polynomial-kernel MMD^2 on all rows and on `replicates` paired resamples.

    sample_features (m, D) in sample order, reference_features (r, D). Replicate b resamples the
    sample rows at resample_positions(m, seed, b, "samples") and the reference rows at
    resample_positions(r, seed, b, "reference"); within-set means skip pairs of a row with itself
    (see _within_term). Returns (KID on all rows, float64 (replicates,)).
    The kernel matrices are built once, in blocks, for all replicates together; reference_within,
    reference_within_terms(reference_features, R, seed) for any R >= replicates, skips the
    reference's own (the same numbers, computed once per reference).
    """
    x = np.asarray(sample_features, dtype=np.float64)
    y = np.asarray(reference_features, dtype=np.float64)
    m, r = x.shape[0], y.shape[0]
    if m < 2 or r < 2:
        raise PipelineError(f"KID needs at least 2 feature rows per side; got {m} and {r}.")
    if x.shape[1] != y.shape[1]:
        raise PipelineError(f"sample features are {x.shape[1]}-d but reference features {y.shape[1]}-d.")
    cx = _counts(m, seed, replicates, SAMPLES)
    cy = _counts(r, seed, replicates, REFERENCE)
    cross = _quadratic_forms(x, y, cx, cy, polynomial_kernel) / (m * r)
    if reference_within is None:
        within_y = _within_term(y, cy)
    elif len(reference_within) < 1 + replicates:
        raise PipelineError(f"the reference's KID terms cover {len(reference_within) - 1} replicates, "
                            f"fewer than the {replicates} asked for; rerun kid-reference with "
                            f"fid.bootstrap.kid_replicates >= {replicates}.")
    else:
        within_y = np.asarray(reference_within, dtype=np.float64)[:1 + replicates]
    mmd = _within_term(x, cx) + within_y - 2.0 * cross
    return float(mmd[0]), mmd[1:]


# ------------------------------------------------------------------------------------------
# Reading the replicates back (for the report).

# Attributes that must agree for replicate b of two fid files to have resampled the same positions.
PAIRING_ATTRS = ("bootstrap_seed", "seed", "n_samples", "bootstrap_fd_sample_rows",
                 "bootstrap_kid_sample_rows", "bootstrap_kid_reference_rows", "reference_sha256")


@dataclass(frozen=True)
class FidReplicates:
    """A fid file's point values and bootstrap replicates.

    value: FD on all samples; fd_replicates (B_fd,); kid_value: unbiased MMD^2 on all kid rows;
    kid_replicates (B_kid,); n_samples: rows behind FD; pairing: the PAIRING_ATTRS values.
    """

    path: Path
    metric_name: str
    value: float
    fd_replicates: np.ndarray
    kid_value: float
    kid_replicates: np.ndarray
    n_samples: int
    pairing: tuple


def read_fid_replicates(path: str | Path) -> FidReplicates:
    """Read a fid file written with the bootstrap; older files -> PipelineError saying to rerun fid."""
    path = Path(path)
    try:
        with open_verified_h5(path, "delete it and rerun its fid job") as f:
            missing = [k for k in ("fd_replicates", "kid_replicates") if k not in f]
            missing += [k for k in ("kid_value", *PAIRING_ATTRS) if k not in f.attrs]
            if missing:
                raise PipelineError(f"{path} has no bootstrap replicates (missing {', '.join(missing)}); "
                                    f"rerun its fid job with this version of the pipeline.")
            attrs = f.attrs
            return FidReplicates(path, str(attrs["metric_name"]), float(attrs["value"]),
                                 f["fd_replicates"][...], float(attrs["kid_value"]),
                                 f["kid_replicates"][...], int(attrs["n_samples"]),
                                 tuple(_plain(attrs[k]) for k in PAIRING_ATTRS))
    except OSError as err:
        raise PipelineError(f"{path} is not a readable HDF5 file: {err}") from None


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value


def check_paired(a: FidReplicates, b: FidReplicates) -> None:
    """PipelineError unless replicate k of `a` and of `b` resampled the same positions."""
    differing = [f"{name} ({x} vs {y})" for name, x, y in zip(PAIRING_ATTRS, a.pairing, b.pairing) if x != y]
    if differing:
        raise PipelineError(f"{a.path} and {b.path} are not paired: {', '.join(differing)} differ; "
                            f"compute both with the same N, seeds and reference.")


# ------------------------------------------------------------------------------------------
# The reference's KID terms, computed once per reference by the kid-reference stage.

def write_reference_within(path: str | Path, within: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write the (1 + R,) terms of reference_within_terms as dataset "within", with `attrs`."""
    with sealed_h5(path) as f:
        f.create_dataset("within", data=np.asarray(within, dtype=np.float64))
        write_attrs(f, dict(attrs))


def read_reference_within(path: str | Path, reference_sha256: str, replicates: int, seed: int) -> np.ndarray:
    """The terms of a kid-reference file, checked against the reference and the bootstrap in use."""
    path = Path(path)
    fix = "delete it and rerun its kid_reference job"
    with open_verified_h5(path, fix) as f:
        if "within" not in f or "reference_sha256" not in f.attrs:
            raise PipelineError(f"{path} is not a kid-reference file (no 'within' terms); {fix}.")
        attrs = {key: _plain(f.attrs[key]) for key in ("reference_sha256", "bootstrap_seed", "kid_replicates")}
        within = f["within"][...]
    if attrs["reference_sha256"] != reference_sha256:
        raise PipelineError(f"{path} was computed from another reference file than the one given "
                            f"(sha256 {attrs['reference_sha256'][:12]}... vs {reference_sha256[:12]}...); {fix}.")
    if attrs["bootstrap_seed"] != seed or attrs["kid_replicates"] < replicates:
        raise PipelineError(f"{path} holds {attrs['kid_replicates']} replicates of bootstrap seed "
                            f"{attrs['bootstrap_seed']}, but this fid job draws {replicates} with seed {seed}; {fix} "
                            f"with the same fid.bootstrap.")
    return within
