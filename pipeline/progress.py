"""Progress of long loops and the stages' log lines, on stderr through `logging`.

Snakemake sends each job's stderr to its log file (and SLURM to the job's log), where a tqdm bar
is either absent (`--no-progress`) or a blur of carriage returns. So a loop reports through a
`Progress`: on a terminal, and unless `--no-progress` was given, it is a tqdm bar; otherwise it
writes one plain timestamped line for the first unit of work, then one every `interval` seconds,
and one for the last. The interval is cosmetic: it is never part of a stage's settings, so it
neither changes results nor makes outputs stale.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_INTERVAL = 30.0
INTERVAL_VARIABLE = "PIPELINE_PROGRESS_SECONDS"
# Messages start with the stage or loop they come from ("train adm: ...").
LOG_FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_interval = DEFAULT_INTERVAL
_handler: logging.Handler | None = None


def interval_from_environment() -> float:
    """Seconds between progress lines: $PIPELINE_PROGRESS_SECONDS, else the default (30)."""
    text = os.environ.get(INTERVAL_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise PipelineError(f"{INTERVAL_VARIABLE}={text!r} is not a number of seconds >= 0; "
                            f"set it to e.g. 30 or unset it.")
    return value


def configure(interval: float) -> None:
    """Send the pipeline's log records (INFO and above) to stderr; progress lines every `interval` s.

    Called once per process by the command line. The handler sits on the "pipeline" logger, not the
    root, so a host program's (or pytest's) logging setup is left alone; calling again replaces it.
    """
    global _interval, _handler
    if not interval >= 0 or math.isinf(interval):
        raise PipelineError(f"--progress-every must be a number of seconds >= 0, got {interval}.")
    _interval = float(interval)
    logger = logging.getLogger("pipeline")
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


def interval() -> float:
    """The configured seconds between progress lines."""
    return _interval


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m, 3d04h."""
    if not math.isfinite(seconds):
        return "?"
    whole = max(0, int(round(seconds)))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts the units of work of one loop and reports them (see the module docstring).

    `unit` is the plural name of the units ("steps", "images", "draws"); `initial` units were
    done by an earlier invocation (a resumed run) and count towards done/total but not the rate.
    `bar`: the caller allows a bar (False with --no-progress); a bar also needs a terminal.
    `enabled=False` reports nothing (the other processes of a data-parallel run). Use it as a
    context manager, or call close(), so the last line is written.
    """

    def __init__(self, logger: logging.Logger, desc: str, total: int, unit: str, *, initial: int = 0,
                 bar: bool = True, enabled: bool = True, every: float | None = None) -> None:
        self.logger, self.desc, self.total, self.unit = logger, desc, int(total), unit
        self.done = self.initial = int(initial)
        self.fields: dict[str, Any] = {}
        self.enabled = enabled
        self.every = interval() if every is None else float(every)
        self.started = time.perf_counter()
        self._last_line: float | None = None
        self._reported = self.done
        self._bar = None
        if enabled and bar and _is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit.rstrip("s") or unit,
                             dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1, **fields: Any) -> None:
        """`n` more units done; `fields` (e.g. loss=0.05) are shown from now on."""
        self.done += int(n)
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(self.fields, refresh=False)
            self._bar.update(int(n))
            return
        now = time.perf_counter()
        if self._last_line is None or now - self._last_line >= self.every or self.done >= self.total:
            self._emit(now)

    def set_fields(self, **fields: Any) -> None:
        """Change the shown fields without counting work."""
        self.update(0, **fields)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done != self._reported:
            self._emit(time.perf_counter())

    def rate(self, now: float | None = None) -> float:
        """Units per second in this invocation (0 before any)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        counted = self.done - self.initial
        return counted / elapsed if counted > 0 and elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float:
        """Seconds left at the current rate (inf before any work, 0 when done)."""
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        rate = self.rate(now)
        return left / rate if rate > 0 else math.inf

    def line(self, now: float | None = None) -> str:
        """The plain progress line, e.g. "train adm: steps 120/700 (17%), loss 0.0512, 3.41 steps/s, ..."."""
        now = time.perf_counter() if now is None else now
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.unit} {self.done}/{self.total} ({percent:.0f}%)"]
        parts += [f"{name} {_format(value)}" for name, value in self.fields.items()]
        parts += [f"{_rate(self.rate(now))} {self.unit}/s", f"elapsed {duration(now - self.started)}",
                  f"ETA {duration(self.eta(now))}"]
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        self.logger.info(self.line(now))
        self._last_line, self._reported = now, self.done


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
