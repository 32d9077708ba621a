"""Power of a paired-seed comparison: how many seeds decide an effect, and what n seeds can decide.

A claim compares two arms A and B run with the same seeds (same initialisation, timesteps and
noise), and its interval is Student's t over the per-seed differences d_s = A_s - B_s. Its
half-width is t(1 - alpha/2, n - 1) * sd(d) / sqrt(n), so everything here depends on sd(d):
the pilot measures it, and the correlation of A and B across seeds says how much pairing saves
(sd(d)^2 = sd(A)^2 + sd(B)^2 - 2 r sd(A) sd(B)).

Seeds needed for power 1 - beta use the usual iterative rule
    t(1 - alpha/2, n - 1) + t(1 - beta, n - 1) <= |effect| sqrt(n) / sd(d),
which replaces the noncentral t by a shifted central t (accurate to about one seed for n >= 4).
At power 0.5 the second term is 0: the interval is expected to just exclude zero, i.e. an effect of
exactly that size is decided half the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stats.intervals import student_t_quantile

# Past this many seeds the answer is "not with seeds": say so rather than loop.
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class PairedSpread:
    """Seed-to-seed spread of two paired arms.

    n: seeds with both arms; mean_difference, sd_difference: of d_s = A_s - B_s (ddof 1);
    sd_a, sd_b: of each arm across seeds; correlation: Pearson r of A_s and B_s (nan when an arm
    does not vary); sd_unpaired: sqrt(sd_a^2 + sd_b^2), the sd of A - B had the seeds been
    independent, so sd_difference / sd_unpaired is what pairing saves.
    """

    n: int
    mean_difference: float
    sd_difference: float
    sd_a: float
    sd_b: float
    correlation: float
    sd_unpaired: float


def paired_spread(a: Sequence[float], b: Sequence[float]) -> PairedSpread:
    """Spread of per-seed values a (n,) and b (n,), seed s in position s of both."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise PipelineError(f"paired arms need one value per seed each; got {a.size} and {b.size}.")
    if a.size < 2:
        raise PipelineError(f"a seed-to-seed spread needs at least 2 seeds; got {a.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise PipelineError("paired arms hold non-finite values; fix or drop the runs that produced them.")
    sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    correlation = float(np.corrcoef(a, b)[0, 1]) if sd_a > 0 and sd_b > 0 else math.nan
    d = a - b
    return PairedSpread(int(a.size), float(d.mean()), float(d.std(ddof=1)), sd_a, sd_b, correlation,
                        math.hypot(sd_a, sd_b))


def _check(sd: float, level: float, power: float) -> None:
    if not (math.isfinite(sd) and sd >= 0):
        raise PipelineError(f"the sd of the paired difference must be finite and >= 0; got {sd}.")
    if not 0.0 < level < 1.0:
        raise PipelineError(f"a confidence level must lie strictly between 0 and 1; got {level}.")
    if not 0.5 <= power < 1.0:
        raise PipelineError(f"power must lie in [0.5, 1); got {power}.")


def _required_ratio(n: int, level: float, power: float) -> float:
    """(t(1 - alpha/2, n-1) + t(power, n-1)) / sqrt(n): the smallest |effect| / sd that n seeds decide."""
    return (student_t_quantile(0.5 + level / 2, n - 1) + student_t_quantile(power, n - 1)) / math.sqrt(n)


def seeds_needed(effect: float, sd: float, level: float = 0.95, power: float = 0.8) -> int | None:
    """Fewest seeds (>= 2) whose t interval excludes zero for `effect` with probability `power`.

    None when no count up to MAX_SEEDS does (effect 0, or tiny against sd). sd 0 gives 2.
    """
    _check(sd, level, power)
    if not math.isfinite(effect) or effect == 0:
        return None
    if sd == 0:
        return 2
    ratio = abs(effect) / sd
    # The requirement falls monotonically with n: double to bracket, then bisect.
    high = 2
    while _required_ratio(high, level, power) > ratio:
        if high >= MAX_SEEDS:
            return None
        high = min(2 * high, MAX_SEEDS)
    low = max(2, high // 2)
    if _required_ratio(low, level, power) <= ratio:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        if _required_ratio(mid, level, power) <= ratio:
            high = mid
        else:
            low = mid
    return high


def minimum_detectable_effect(sd: float, seeds: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest |effect| that `seeds` paired seeds decide with probability `power` (inf for 1 seed)."""
    _check(sd, level, power)
    if int(seeds) != seeds or seeds < 1:
        raise PipelineError(f"the number of seeds must be a whole number >= 1; got {seeds}.")
    if seeds == 1:
        return math.inf
    return _required_ratio(int(seeds), level, power) * sd
