"""argparse `type=` functions: a stage's command line refuses what the config schema refuses.

Each raises argparse.ArgumentTypeError with a short reason; argparse names the flag, and the
CLI prints the result as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import re

from pipeline.config import nonfinite_problems

# The schema's rule for recipe names: no path separators, no leading dot, so a name can never
# lead a run folder out of the results tree.
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def int_at_least(minimum: int):
    """A type for counts with a floor above 1 (e.g. a surface grid needs 3 points per axis)."""
    def at_least(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    at_least.__name__ = f"int_at_least_{minimum}"
    return at_least


def nonnegative_int(text: str) -> int:
    """Seeds and counts where 0 means none."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def path_name(text: str) -> str:
    """A dataset or recipe name, which becomes a folder under the results tree."""
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name (a letter, then letters, digits, '_', '.' "
                                         f"or '-'); it becomes a folder under the results tree")
    return text


def settings_json(text: str) -> str:
    """A JSON object with finite numbers; returned as given, so the stages parse it as before."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a JSON object or leave the flag out to read --config")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({err.msg} at line {err.lineno}, "
                                         f"column {err.colno})") from None
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    problems = nonfinite_problems(value)
    if problems:
        raise argparse.ArgumentTypeError(problems[0])
    return text


def _refuse_constant(constant: str):
    raise ValueError(f"holds {constant}; numbers must be finite")
