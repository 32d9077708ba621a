"""Intervals and verdicts of pipeline.stats: fixtures with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stats import (HELD, INCONCLUSIVE, NOT_HELD, Interval, bootstrap_interval,
                            directional_verdict, equivalence_verdict, normal_interval,
                            paired_bootstrap_difference, student_t_quantile, t_interval)

# Two-sided 97.5% points of Student's t from printed tables.
T_TABLE = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 10: 2.228139, 30: 2.042272}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE.items()))
def test_student_t_quantile_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_student_t_quantile_approaches_normal():
    assert student_t_quantile(0.975, 1000) == pytest.approx(1.962339, abs=1e-5)  # tables
    assert 1.959964 < student_t_quantile(0.975, 20000) < 1.9601
    assert student_t_quantile(0.5, 7) == 0.0


def seed_pairs(effect: float, seeds: int, rng: np.random.Generator) -> np.ndarray:
    """Per-seed differences A - B of two groups with a shared seed effect, independent noise."""
    shared = rng.normal(0, 5.0, seeds)  # seed effect common to both arms cancels in the difference
    a = 10.0 + effect + shared + rng.normal(0, 1.0, seeds)
    b = 10.0 + shared + rng.normal(0, 1.0, seeds)
    return a - b


def test_noise_only_is_inconclusive_real_effect_held_reverse_not_held():
    rng = np.random.default_rng(0)
    noise = t_interval(seed_pairs(0.0, 5, rng))
    assert directional_verdict(noise, "lower").label == INCONCLUSIVE
    lower = t_interval(seed_pairs(-5.0, 5, rng))
    assert lower.high < 0 and directional_verdict(lower, "lower").label == HELD
    assert directional_verdict(lower, "higher").label == NOT_HELD
    assert lower.method == "t over 5 paired seeds" and lower.n == 5


def test_one_value_never_gives_held():
    single = t_interval([-100.0])
    assert single.low == -math.inf and single.high == math.inf and "variance unknown" in single.method
    assert directional_verdict(single, "lower").label == INCONCLUSIVE
    assert equivalence_verdict(single, 1.0).label == INCONCLUSIVE
    assert equivalence_verdict(single, 1.0, "higher").label == INCONCLUSIVE


def test_t_interval_matches_hand_computation():
    values = [1.0, 2.0, 4.0]
    interval = t_interval(values, level=0.95)
    half = 4.302653 * np.std(values, ddof=1) / math.sqrt(3)
    assert interval.estimate == pytest.approx(7 / 3)
    assert (interval.low, interval.high) == pytest.approx((7 / 3 - half, 7 / 3 + half), abs=1e-5)


def test_equivalence_tiny_and_large_differences():
    def interval(low, high):
        return Interval((low + high) / 2, low, high, 0.95, "test", 3)
    assert equivalence_verdict(interval(-0.1, 0.2), margin=1.0).label == HELD
    assert equivalence_verdict(interval(3.0, 5.0), margin=1.0).label == NOT_HELD
    assert equivalence_verdict(interval(-5.0, -3.0), margin=1.0).label == NOT_HELD
    assert equivalence_verdict(interval(0.5, 1.5), margin=1.0).label == INCONCLUSIVE
    # One-sided: a large improvement is no harm; harm beyond the margin is not held.
    assert equivalence_verdict(interval(-5.0, -3.0), margin=1.0, direction="higher").label == HELD
    assert equivalence_verdict(interval(1.5, 3.0), margin=1.0, direction="higher").label == NOT_HELD
    assert equivalence_verdict(interval(0.5, 1.5), margin=1.0, direction="higher").label == INCONCLUSIVE
    assert equivalence_verdict(interval(3.0, 5.0), margin=1.0, direction="lower").label == HELD
    assert equivalence_verdict(interval(-3.0, -1.5), margin=1.0, direction="lower").label == NOT_HELD
    rule = equivalence_verdict(interval(-0.1, 0.2), margin=1.0).rule
    assert "95% CI" in rule and "1" in rule


def test_rules_name_level_and_side():
    interval = Interval(-2.0, -3.0, -1.0, 0.9, "test", 3)
    verdict = directional_verdict(interval, "lower")
    assert verdict.label == HELD and str(verdict) == HELD
    assert verdict.rule.startswith("held if the 90% CI lies below 0")


def test_bad_inputs_are_refused():
    with pytest.raises(PipelineError, match="no values"):
        t_interval([])
    with pytest.raises(PipelineError, match="not finite"):
        t_interval([1.0, float("nan")])
    with pytest.raises(PipelineError, match="between 0 and 1"):
        t_interval([1.0, 2.0], level=95)
    with pytest.raises(PipelineError, match="direction"):
        directional_verdict(t_interval([1.0, 2.0]), "down")
    with pytest.raises(PipelineError, match="margin"):
        equivalence_verdict(t_interval([1.0, 2.0]), margin=0)
    with pytest.raises(PipelineError, match="equal counts"):
        paired_bootstrap_difference(0, [1, 2, 3], 0, [1, 2])


def test_bootstrap_drops_few_nonfinite_and_refuses_many():
    reps = np.linspace(0, 1, 100)
    with_nan = reps.copy()
    with_nan[:3] = np.nan
    interval = bootstrap_interval(0.5, with_nan, description="paired bootstrap over 64 samples")
    assert interval.n == 97 and "3 non-finite dropped" in interval.method
    assert interval.method.startswith("paired bootstrap over 64 samples, 97 replicates")
    with_nan[:6] = np.inf
    with pytest.raises(PipelineError, match="6 of 100"):
        bootstrap_interval(0.5, with_nan)
    with pytest.raises(PipelineError, match="at least 2"):
        bootstrap_interval(0.5, [])


def test_normal_interval():
    interval = normal_interval(1.0, 0.5, 0.95)
    assert (interval.low, interval.high) == pytest.approx((1.0 - 0.98, 1.0 + 0.98), abs=1e-3)


def test_t_and_bootstrap_intervals_cover_at_the_nominal_rate():
    """200 seeded repetitions: the true difference falls inside about 95% of the intervals."""
    rng = np.random.default_rng(1234)
    true_difference = 0.7
    t_hits = boot_hits = 0
    repetitions = 200
    for _ in range(repetitions):
        t_hits += t_interval(seed_pairs(true_difference, 6, rng)).contains(true_difference)
        # Paired samples: the percentile bootstrap of the mean difference over 80 pairs.
        shared = rng.normal(0, 3.0, 80)
        a = shared + true_difference + rng.normal(0, 1.0, 80)
        b = shared + rng.normal(0, 1.0, 80)
        draws = rng.integers(0, 80, size=(300, 80))
        reps_a, reps_b = a[draws].mean(axis=1), b[draws].mean(axis=1)
        interval = paired_bootstrap_difference(a.mean(), reps_a, b.mean(), reps_b)
        boot_hits += interval.contains(true_difference)
    assert 0.88 <= t_hits / repetitions <= 0.99
    assert 0.88 <= boot_hits / repetitions <= 0.99
