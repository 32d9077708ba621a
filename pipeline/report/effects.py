"""Effects with intervals: every number the claims compare, and how sure we are of it.

A measured quantity of one weights variant of one training run is a `Reading`: its value and,
where the measure has noise of its own, the draw-level replicates it came from. Replicates are
aligned across models: every model is scored on the same sample indices (FD, KID: paired
bootstrap, image i starts from the same x_T), the same weight-noise draws (LPF) or the same
directions (perturbation), so replicate b of one model pairs with replicate b of another.

An `Effect` combines readings of several "arms" (ADM raw, +SAM raw, ...) seed by seed, e.g.
LPF(+SAM) - LPF(ADM) or |change under int8 of +SAM| - |that of ADM|. Its interval:
- with two or more training seeds, Student-t over the per-seed effects (paired by seed: the
  same seed gives both arms the same initialisation and data order);
- with one seed, the draw-level interval (percentile over paired bootstrap replicates, t over
  paired Monte-Carlo draws, or a normal interval from standard errors). It leaves out the
  training-seed variance, so a difference between training runs is never decided on it: such an
  effect is not `decisive`, and its verdict is inconclusive whatever the interval says.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from pipeline.stats.intervals import Interval, bootstrap_interval, normal_interval, t_interval
from pipeline.stats.verdicts import (HELD, INCONCLUSIVE, NOT_HELD, directional_verdict,
                                     equivalence_verdict)

BOOTSTRAP, DRAWS, NONE = "bootstrap", "draws", "none"
ONE_SEED_RULE = "one training seed: a difference between training runs is not decided on draw-level noise"


@dataclasses.dataclass(frozen=True)
class Reading:
    """One measured number of one model.

    :param value: the measured value.
    :param replicates: (B,) draw-level replicates aligned across models, or None.
    :param kind: BOOTSTRAP (percentile interval), DRAWS (Monte-Carlo draws whose mean is the
                 value: t interval) or NONE (no replicates).
    :param stderr: a standard error of `value` when there are no replicates (exposure: over images).
    """

    value: float
    replicates: np.ndarray | None = None
    kind: str = NONE
    stderr: float | None = None


Arm = Callable[[int], "Reading | None"]  # seed -> the reading of one model, None when not measured


@dataclasses.dataclass(frozen=True)
class Effect:
    """An effect over seeds. `interval` decides the verdict; `draw_interval` is the one-seed view."""

    interval: Interval
    per_seed: np.ndarray
    basis: str  # "seeds" or "draws"
    between_runs: bool
    draw_interval: Interval | None
    # (n, 2): per seed, the two sides whose difference is the effect (see SIDES); None for other combines.
    sides: np.ndarray | None = None

    @property
    def decisive(self) -> bool:
        """Can a verdict rest on `interval`? Not for between-run differences measured on one seed."""
        return not (self.between_runs and self.basis != "seeds")

    def cell(self, digits: int = 4) -> str:
        """"-0.0123 [-0.0201, -0.004513]"; "-34.71 (no interval)" when neither side is bounded (a measure
        without draw-level uncertainty); one unbounded side prints as -inf / inf."""
        iv = self.interval
        if not (math.isfinite(iv.low) or math.isfinite(iv.high)):
            return f"{iv.estimate:+.{digits}g} (no interval)"
        return f"{iv.estimate:+.{digits}g} [{_bound(iv.low, digits)}, {_bound(iv.high, digits)}]"


def _bound(value: float, digits: int) -> str:
    # As many significant digits as the estimate: with one fewer, a bound of 1002 around 1000
    # printed as "1e+03", and bounds could read coarser than the value they bracket.
    return f"{value:+.{digits}g}" if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def identity(x):
    return x


def difference(a, b):
    return a - b


def abs_difference(a, b):
    return np.abs(a) - np.abs(b)


def change_difference(a_after, a_before, b_after, b_before):
    """|a_after - a_before| - |b_after - b_before|: who changes less."""
    return np.abs(a_after - a_before) - np.abs(b_after - b_before)


# combine -> the two sides (A, B) it subtracts, so that combine(...) == A - B: what a power analysis
# pairs seed by seed (their correlation is what pairing by seed saves).
SIDES: dict[Callable, Callable] = {
    difference: lambda a, b: (a, b),
    abs_difference: lambda a, b: (abs(a), abs(b)),
    change_difference: lambda a_after, a_before, b_after, b_before: (abs(a_after - a_before), abs(b_after - b_before)),
}


def effect(arms: Sequence[Arm], combine: Callable, seeds: Sequence[int], level: float,
           between_runs: bool) -> Effect | None:
    """The effect `combine(*arm values)` per seed, with its interval; None when nothing was measured.

    :param arms: one function per model, seed -> Reading (all arms must be read on a seed for it
                 to count).
    :param combine: elementwise on floats and on (B,) replicate arrays.
    :param between_runs: the arms come from different training runs of one seed (different
                         recipes, or two seeds), as opposed to variants of one run (averages,
                         precisions, T' of the same weights).
    """
    per_seed, sides, first = [], [], None
    for seed in seeds:
        readings = [arm(seed) for arm in arms]
        if any(r is None for r in readings):
            continue
        values = [r.value for r in readings]
        per_seed.append(float(combine(*values)))
        if combine in SIDES:
            sides.append([float(side) for side in SIDES[combine](*values)])
        first = first or readings
    if not per_seed:
        return None
    both = np.asarray(sides, dtype=np.float64) if sides else None
    if len(per_seed) >= 2:
        # The seeds decide; the first seed's draw-level interval is not needed (nor computed).
        return Effect(t_interval(np.asarray(per_seed), level, unit="paired seeds"), np.asarray(per_seed), "seeds",
                      between_runs, None, both)
    draw = draw_level_interval(first, combine, per_seed[0], level)
    return Effect(draw, np.asarray(per_seed), "draws", between_runs, draw, both)


def draw_level_interval(readings: Sequence[Reading], combine: Callable, estimate: float, level: float) -> Interval:
    """The interval of one seed's effect from its readings' replicates (or standard errors)."""
    kinds = {r.kind for r in readings}
    lengths = {len(r.replicates) for r in readings if r.replicates is not None}
    if kinds == {BOOTSTRAP} and len(lengths) == 1:
        replicates = np.asarray(combine(*[r.replicates for r in readings]), dtype=np.float64)
        # Centred on the estimate: a resample repeats images, which raises FD's small-sample bias in
        # every replicate, so the replicates give the spread of the estimate, not its location.
        finite = replicates[np.isfinite(replicates)]
        centred = replicates - (finite.mean() if finite.size else 0.0) + estimate
        return bootstrap_interval(estimate, centred, level, description="paired bootstrap, centred on the estimate")
    if kinds == {DRAWS} and len(lengths) == 1:
        # The value is the mean of the draws, and combine is linear for every draw-based effect.
        return t_interval(np.asarray(combine(*[r.replicates for r in readings]), dtype=np.float64), level,
                          unit="paired draws")
    errors = [r.stderr for r in readings]
    # |a| - |b| moves like sign(a) a - sign(b) b for values well away from 0 (delta method).
    if combine in (identity, difference, abs_difference) and all(e is not None for e in errors):
        return normal_interval(estimate, math.sqrt(sum(e * e for e in errors)), level)
    return Interval(estimate, -math.inf, math.inf, level, "no draw-level uncertainty for this measure", 1)


def value_cell(effect_: Effect | None, digits: int = 4) -> str:
    """A table cell for one model's value: "0.1234 [0.1203, 0.1271]", "" when not measured."""
    if effect_ is None:
        return ""
    iv = effect_.interval
    bounds = f" [{_bound(iv.low, digits)}, {_bound(iv.high, digits)}]" if math.isfinite(iv.low) else ""
    return f"{iv.estimate:.{digits}g}{bounds}".replace("[+", "[").replace(", +", ", ")


def verdict(effect_: Effect, direction: str) -> tuple[str, str]:
    """(verdict, rule) of a directional claim: the effect is below 0 ("lower") or above ("higher")."""
    decided = directional_verdict(effect_.interval, direction)
    if not effect_.decisive:
        return INCONCLUSIVE, f"{decided.rule}; {ONE_SEED_RULE}"
    return decided.label, decided.rule


def no_effect_verdict(effect_: Effect, margin: float, direction: str) -> tuple[str, str]:
    """(verdict, rule) of a no-effect claim: no effect beyond `margin` on the `direction` side."""
    decided = equivalence_verdict(effect_.interval, margin, direction)
    if not effect_.decisive:
        return INCONCLUSIVE, f"{decided.rule}; {ONE_SEED_RULE}"
    return decided.label, decided.rule


def _percent(level: float) -> str:
    return f"{100 * level:g}%"


__all__ = ["BOOTSTRAP", "DRAWS", "NONE", "Reading", "Arm", "Effect", "effect", "verdict", "no_effect_verdict",
           "identity", "difference", "abs_difference", "change_difference", "HELD", "NOT_HELD", "INCONCLUSIVE"]


# ------------------------------------------------------------------------------------------
# Arms: how each measure of the collected data becomes a Reading per seed.

def _row(frame, **key):
    """The single row of `frame` matching `key`, or None."""
    if frame is None:
        return None
    mask = np.ones(len(frame), dtype=bool)
    for name, value in key.items():
        mask &= (frame[name] == value).to_numpy()
    rows = frame.loc[mask]
    return None if rows.empty else rows.iloc[0]


def _replicates(values) -> np.ndarray | None:
    array = np.asarray(values, dtype=np.float64)
    return array if array.size else None


def _fid_file_arm(data, key: dict, value_column: str, replicates_column: str) -> Arm:
    """One number of a fid file (FD or KID) with its paired bootstrap replicates."""
    def arm(seed: int) -> Reading | None:
        row = _row(data.fid, **key, seed=seed)
        if row is None:
            return None
        replicates = _replicates(row[replicates_column])
        return Reading(float(row[value_column]), replicates, BOOTSTRAP if replicates is not None else NONE)
    return arm


def fd_arm(data, dataset: str, recipe: str, average: str, precision: str, steps: int) -> Arm:
    """FD of one variant, with its paired bootstrap replicates (sample indices resampled)."""
    key = dict(dataset=dataset, recipe=recipe, average=average, precision=precision, steps=steps)
    return _fid_file_arm(data, key, "value", "fd_replicates")


def kid_arm(data, dataset: str, recipe: str, average: str, precision: str, steps: int) -> Arm:
    """Unbiased KID of one variant, with paired bootstrap replicates (samples and reference resampled)."""
    key = dict(dataset=dataset, recipe=recipe, average=average, precision=precision, steps=steps)
    return _fid_file_arm(data, key, "kid_value", "kid_replicates")


def calibration_reading(data, dataset: str, kind: str, column: str) -> Reading | None:
    """The floor's or static's FD ("value") or KID ("kid_value") with its replicates, None when absent."""
    frame = data.calibration
    rows = None if frame is None else frame[(frame.dataset == dataset) & (frame.kind == kind)]
    if rows is None or rows.empty:
        return None
    row = rows.iloc[0]
    replicates = _replicates(row["fd_replicates" if column == "value" else "kid_replicates"])
    return Reading(float(row[column]), replicates, BOOTSTRAP if replicates is not None else NONE)


def lpf_arm(data, dataset: str, recipe: str, average: str, scaling: str, sigma: float | None = None,
            increase: bool = False) -> Arm:
    """LPF at `sigma` (None: the configured one) with its Monte-Carlo draws, shared by every model.

    increase=True: LPF minus the unperturbed loss (per draw too), so that a model whose base loss is
    higher does not look sharper for that alone.
    """
    def arm(seed: int) -> Reading | None:
        key = dict(dataset=dataset, recipe=recipe, seed=seed, average=average, scaling=scaling)
        row = _row(data.lpf, **key, main=True) if sigma is None else _row(data.lpf, **key, sigma=sigma)
        if row is None:
            return None
        draws = np.asarray(row["draw_losses"], dtype=np.float64)
        if increase:
            return Reading(float(row["difference"]), draws - float(row["loss"]), DRAWS)
        return Reading(float(row["lpf"]), draws, DRAWS)
    return arm


def perturbation_arm(data, dataset: str, recipe: str, average: str) -> Arm:
    """Loss increase at the largest perturbation norm, over directions shared by every model."""
    def arm(seed: int) -> Reading | None:
        row = _row(data.perturbation, dataset=dataset, recipe=recipe, seed=seed, average=average)
        if row is None:
            return None
        return Reading(float(row["increase"]), np.asarray(row["increases"], dtype=np.float64), DRAWS)
    return arm


def hessian_arm(data, dataset: str, recipe: str, average: str, column: str) -> Arm:
    """Hessian top eigenvalue (no draw-level error) or trace (Hutchinson's standard error)."""
    def arm(seed: int) -> Reading | None:
        row = _row(data.hessian, dataset=dataset, recipe=recipe, seed=seed, average=average)
        if row is None:
            return None
        stderr = float(row["trace_stderr"]) if column == "trace" else None
        return Reading(float(row[column]), None, NONE, stderr)
    return arm


def exposure_arm(data, dataset: str, recipe: str, average: str, steps: int) -> Arm:
    """The eps-norm gap at T' with its standard error over images."""
    def arm(seed: int) -> Reading | None:
        row = _row(data.exposure, dataset=dataset, recipe=recipe, seed=seed, average=average, steps=steps)
        if row is None:
            return None
        return Reading(float(row["gap_l2_mean"]), None, NONE, float(row["gap_l2_mean_stderr"]))
    return arm
