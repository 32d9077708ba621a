"""Confidence intervals and claim verdicts (numpy and the standard library only).

`intervals` turns per-seed differences or bootstrap replicates into an `Interval`; `verdicts`
turns an `Interval` into "held" / "not held" / "inconclusive" with the rule that decided it.
"""

from pipeline.stats.intervals import (Interval, bootstrap_interval, normal_interval,
                                      paired_bootstrap_difference, student_t_quantile, t_interval)
from pipeline.stats.verdicts import (HELD, INCONCLUSIVE, NOT_HELD, Verdict, directional_verdict,
                                     equivalence_verdict)

__all__ = ["Interval", "bootstrap_interval", "normal_interval", "paired_bootstrap_difference",
           "student_t_quantile", "t_interval", "HELD", "INCONCLUSIVE", "NOT_HELD", "Verdict",
           "directional_verdict", "equivalence_verdict"]
