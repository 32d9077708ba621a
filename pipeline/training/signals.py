"""SIGTERM and SIGINT while training: noted, then acted on at the next step boundary.

SLURM sends SIGTERM before a job's time limit (profiles/slurm asks for it) and `kill` sends it by
default; Ctrl-C sends SIGINT. Either one makes the loop write its checkpoint after the step in
flight and exit with EXIT_STOPPED, so rerunning the same command resumes bit-identically.
"""

from __future__ import annotations

import signal
import threading

# Exit status of a run stopped by a signal after its checkpoint: EX_TEMPFAIL of sysexits.h, "try
# again later" (a failure is 2, a refused argument 2, a kill -9 137).
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered: SIGTERM and SIGINT set `received` (the signal's name) instead of ending the
    process; the previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name


class TrainingStopped(Exception):
    """A signal stopped training at a step boundary, after the checkpoint was written."""
