"""Confidence intervals: Student t over paired seeds, percentile bootstrap, normal approximation.

Every function returns an `Interval`. Inputs that cannot give an interval (no values, non-finite
values, a level outside (0, 1)) raise PipelineError with the reason.

The Student-t quantile is computed here from the exact finite series for integer degrees of
freedom (Abramowitz & Stegun 26.7.3-4) and inverted by bisection: per-seed intervals only ever
need integer df, and the pipeline's environment does not ship scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from pipeline.errors import PipelineError

# Refuse a bootstrap whose replicates are more than this share non-finite: the survivors would
# no longer be a sample of the statistic's distribution.
MAX_NONFINITE_SHARE = 0.05


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval [low, high] around `estimate` at confidence `level`.

    method: how it was obtained, short enough for a table cell ("t over 3 paired seeds").
    n: the count behind it (seeds for `t_interval`, finite replicates for the bootstrap).
    low/high may be -inf/+inf when the data cannot bound the effect (one seed).
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str
    n: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise PipelineError(f"a confidence level must lie strictly between 0 and 1; got {level}.")
    return level


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 and t >= 0 (A&S 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    # Both parities share the recurrence term_e = term_(e-2) * cos^2 * (e-1)/e.
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term = total = math.cos(theta)
        exponents = range(3, df - 1, 2)
    else:
        term = total = 1.0
        exponents = range(2, df - 1, 2)
    for e in exponents:
        term *= cos2 * (e - 1) / e
        total += term
    return (2.0 / math.pi) * (theta + sin * total) if df % 2 == 1 else sin * total


def student_t_quantile(probability: float, df: int) -> float:
    """q with P(T <= q) = probability for Student's t with integer `df` >= 1."""
    if int(df) != df or df < 1:
        raise PipelineError(f"Student's t needs an integer number of degrees of freedom >= 1; got {df}.")
    p = _check_level(probability)
    if p == 0.5:
        return 0.0
    target = abs(2.0 * p - 1.0)
    low, high = 0.0, 1.0
    while _t_central_probability(high, int(df)) < target:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_central_probability(mid, int(df)) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    q = 0.5 * (low + high)
    return q if p > 0.5 else -q


def _finite_values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise PipelineError(f"{what}: no values to build an interval from.")
    if not np.isfinite(array).all():
        raise PipelineError(f"{what}: {int((~np.isfinite(array)).sum())} of {array.size} values are not "
                            f"finite; fix or drop the runs that produced them.")
    return array


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95, *,
               unit: str = "paired seeds") -> Interval:
    """Student-t interval for the mean of `values` (n,), e.g. per-seed differences A - B.

    n == 1 gives low = -inf, high = +inf: one value says nothing about the spread, so no claim
    can be held on it.
    """
    level = _check_level(level)
    x = _finite_values(values, "t interval")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, -math.inf, math.inf, level, f"n = 1 ({unit}): variance unknown, no interval", 1)
    stderr = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = student_t_quantile(0.5 + level / 2, x.size - 1) * stderr
    return Interval(mean, mean - half, mean + half, level, f"t over {x.size} {unit}", int(x.size))


def bootstrap_interval(estimate: float, replicates: Sequence[float] | np.ndarray, level: float = 0.95, *,
                       description: str = "percentile bootstrap") -> Interval:
    """Percentile interval of bootstrap `replicates` (B,) around the full-data `estimate`.

    Non-finite replicates are dropped, but more than 5% of them is refused. The method reads
    "{description}, {B} replicates"; pass e.g. description="paired bootstrap over 2000 samples".
    """
    level = _check_level(level)
    reps = np.asarray(replicates, dtype=np.float64).ravel()
    finite = reps[np.isfinite(reps)]
    dropped = reps.size - finite.size
    if dropped > MAX_NONFINITE_SHARE * reps.size:
        raise PipelineError(f"{dropped} of {reps.size} bootstrap replicates are not finite (more than "
                            f"{MAX_NONFINITE_SHARE:.0%}); the statistic is unstable on resamples, so "
                            f"no bootstrap interval is given. Check the inputs for degenerate features.")
    if finite.size < 2:
        raise PipelineError(f"a bootstrap interval needs at least 2 finite replicates; got {finite.size}. "
                            f"Turn the bootstrap on (replicates > 0) and recompute.")
    low, high = np.quantile(finite, [0.5 - level / 2, 0.5 + level / 2])
    method = f"{description}, {finite.size} replicates"
    if dropped:
        method += f" ({dropped} non-finite dropped)"
    return Interval(float(estimate), float(low), float(high), level, method, int(finite.size))


def paired_bootstrap_difference(estimate_a: float, replicates_a: Sequence[float] | np.ndarray,
                                estimate_b: float, replicates_b: Sequence[float] | np.ndarray,
                                level: float = 0.95, *,
                                description: str = "paired bootstrap") -> Interval:
    """Percentile interval of A - B where replicate b of A and of B used the same resample.

    replicates_a, replicates_b: (B,) each, in replicate order (fid files of the same N pair up).
    """
    a = np.asarray(replicates_a, dtype=np.float64).ravel()
    b = np.asarray(replicates_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise PipelineError(f"paired replicates must have equal counts; got {a.size} and {b.size}. "
                            f"Compute both with the same bootstrap settings.")
    return bootstrap_interval(float(estimate_a) - float(estimate_b), a - b, level, description=description)


def normal_interval(estimate: float, stderr: float, level: float = 0.95, *, n: int = 0,
                    description: str = "normal approximation") -> Interval:
    """estimate +- z * stderr with the standard normal quantile z (e.g. 1.96 at 95%)."""
    level = _check_level(level)
    if not (math.isfinite(stderr) and stderr >= 0) or not math.isfinite(estimate):
        raise PipelineError(f"a normal interval needs a finite estimate and a finite stderr >= 0; "
                            f"got estimate {estimate}, stderr {stderr}.")
    half = NormalDist().inv_cdf(0.5 + level / 2) * stderr
    return Interval(float(estimate), estimate - half, estimate + half, level, description, int(n))
