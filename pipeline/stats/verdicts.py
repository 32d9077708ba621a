"""Verdicts on claims from confidence intervals: "held", "not held" or "inconclusive".

An interval is of an effect A - B (e.g. FID of SAM minus FID of ADM). Two kinds of claim:

* directional ("SAM lowers FID"): `directional_verdict(interval, "lower")`.
* no effect ("quantization leaves FID unchanged", within a margin the claim names):
  `equivalence_verdict(interval, margin)`, or one-sided with direction="higher" for
  "raises FID by no more than margin".

Interval ends that touch a boundary count as not excluding it, so a verdict is never decided by
a tie. An infinite interval (one seed) is always inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.stats.intervals import Interval

HELD = "held"
NOT_HELD = "not held"
INCONCLUSIVE = "inconclusive"
DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class Verdict:
    """label: HELD, NOT_HELD or INCONCLUSIVE; rule: one line saying how labels are decided."""

    label: str
    rule: str

    def __str__(self) -> str:
        return self.label


def _check_direction(direction: str | None, allow_none: bool = False) -> None:
    if direction is None and allow_none:
        return
    if direction not in DIRECTIONS:
        raise PipelineError(f"a claim's direction must be one of {', '.join(DIRECTIONS)}"
                            f"{' or None' if allow_none else ''}; got {direction!r}.")


def _ci(interval: Interval) -> str:
    return f"{interval.level:.0%} CI"


def directional_verdict(interval: Interval, direction: str) -> Verdict:
    """Claim: the effect is below 0 (direction "lower") or above 0 ("higher").

    held: the interval excludes 0 on the claimed side; not held: it excludes 0 on the other
    side; inconclusive: it contains 0.
    """
    _check_direction(direction)
    below, above = interval.high < 0, interval.low > 0
    claimed, opposite = (below, above) if direction == "lower" else (above, below)
    other = "above" if direction == "lower" else "below"
    side = "below" if direction == "lower" else "above"
    rule = f"held if the {_ci(interval)} lies {side} 0, not held if {other} 0, else inconclusive"
    label = HELD if claimed else NOT_HELD if opposite else INCONCLUSIVE
    return Verdict(label, rule)


def equivalence_verdict(interval: Interval, margin: float, direction: str | None = None) -> Verdict:
    """Claim: no effect larger than `margin` (> 0).

    direction None (two-sided): held when the interval lies inside (-margin, +margin); not held
    when it lies wholly at or beyond +margin or wholly at or beyond -margin; else inconclusive.
    direction "higher" (non-inferiority, "raises it by less than margin"): held when
    high < margin; not held when low >= margin. "lower" mirrors it at -margin.
    """
    _check_direction(direction, allow_none=True)
    if not (math.isfinite(margin) and margin > 0):
        raise PipelineError(f"an equivalence margin must be a finite number > 0; got {margin}.")
    ci, m = _ci(interval), f"{margin:g}"
    if direction is None:
        held = -margin < interval.low and interval.high < margin
        not_held = interval.low >= margin or interval.high <= -margin
        rule = f"held if the {ci} lies within +-{m}, not held if wholly outside it, else inconclusive"
    elif direction == "higher":
        held, not_held = interval.high < margin, interval.low >= margin
        rule = f"held if the {ci} lies below +{m}, not held if wholly at or above +{m}, else inconclusive"
    else:
        held, not_held = interval.low > -margin, interval.high <= -margin
        rule = f"held if the {ci} lies above -{m}, not held if wholly at or below -{m}, else inconclusive"
    label = HELD if held else NOT_HELD if not_held else INCONCLUSIVE
    return Verdict(label, rule)
