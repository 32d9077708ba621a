"""Seed counts and detectable effects of pipeline.stats.power, against tables and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stats.intervals import student_t_quantile
from pipeline.stats.power import minimum_detectable_effect, paired_spread, seeds_needed


def test_seeds_needed_by_hand():
    # Power 0.5: smallest n with t(0.975, n-1) / sqrt(n) <= 1; n = 6 gives 2.571/2.449 > 1, n = 7 gives 0.925.
    assert seeds_needed(1.0, 1.0, power=0.5) == 7
    # Power 0.8: n = 9 needs 2.306 + 0.889 > 3; n = 10 has 2.262 + 0.883 <= 3.162.
    assert seeds_needed(1.0, 1.0, power=0.8) == 10
    assert seeds_needed(-1.0, 1.0, power=0.8) == 10  # the sign does not matter
    assert seeds_needed(5.0, 0.0) == 2
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(1e-6, 1.0) is None


@pytest.mark.parametrize("seeds", [3, 5, 8, 20])
def test_minimum_detectable_effect_inverts_seeds_needed(seeds):
    mde = minimum_detectable_effect(2.0, seeds, power=0.8)
    assert seeds_needed(mde * 1.0001, 2.0, power=0.8) == seeds
    assert seeds_needed(mde * 0.98, 2.0, power=0.8) > seeds
    half = minimum_detectable_effect(2.0, seeds, power=0.5)
    assert half == pytest.approx(student_t_quantile(0.975, seeds - 1) * 2.0 / math.sqrt(seeds))
    assert minimum_detectable_effect(2.0, 1) == math.inf


def test_power_matches_simulation():
    """At the seeds the rule asks for, t intervals exclude zero in about `power` of simulated studies."""
    rng = np.random.default_rng(0)
    n = seeds_needed(1.0, 1.0, power=0.8)
    d = rng.normal(1.0, 1.0, size=(20000, n))
    half = student_t_quantile(0.975, n - 1) * d.std(axis=1, ddof=1) / math.sqrt(n)
    decided = np.mean(d.mean(axis=1) - half > 0)
    assert 0.78 < decided < 0.86  # the shifted-t rule is slightly conservative


def test_paired_spread_shows_what_pairing_saves():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 5.0, 200)
    a = 3.0 + shared + rng.normal(0, 1.0, 200)
    b = shared + rng.normal(0, 1.0, 200)
    spread = paired_spread(a, b)
    assert spread.n == 200 and spread.mean_difference == pytest.approx(3.0, abs=0.3)
    assert spread.sd_difference == pytest.approx(math.sqrt(2), rel=0.15)
    assert spread.correlation > 0.9 and spread.sd_unpaired > 4 * spread.sd_difference  # sqrt(52 / 2) = 5.1 expected


def test_bad_input_is_one_line():
    with pytest.raises(PipelineError, match="at least 2 seeds"):
        paired_spread([1.0], [2.0])
    with pytest.raises(PipelineError, match="one value per seed"):
        paired_spread([1.0, 2.0], [2.0])
    with pytest.raises(PipelineError, match="non-finite"):
        paired_spread([1.0, float("nan")], [2.0, 3.0])
    with pytest.raises(PipelineError, match="power"):
        seeds_needed(1.0, 1.0, power=0.3)
    with pytest.raises(PipelineError, match="whole number"):
        minimum_detectable_effect(1.0, 2.5)
