"""argparse `type=` functions: a stage's command line refuses what the config schema refuses.

Each raises argparse.ArgumentTypeError with a short reason; argparse names the flag, and the
CLI prints the result as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import yaml

from pipeline.config import nonfinite_problems, parse_yaml_text
from pipeline.errors import PipelineError

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
    """--settings: a JSON object or a YAML flow mapping (what the rules pass: it reads well in the
    Snakemake report); checked for duplicate keys and finite numbers, returned as canonical JSON."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a mapping such as '{steps: 10}' or leave the flag "
                                         "out to read the config files")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except ValueError as json_error:
        if not isinstance(json_error, json.JSONDecodeError):
            raise argparse.ArgumentTypeError(str(json_error)) from None
        try:
            value = parse_yaml_text(text)
        except PipelineError as err:  # a duplicate key
            raise argparse.ArgumentTypeError(f"has a {err}") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            reason = getattr(err, "problem", None) or str(err)
            raise argparse.ArgumentTypeError(f"is neither JSON nor a YAML mapping ({reason}{at})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a mapping, got {type(value).__name__}")
    problems = nonfinite_problems(value)
    if problems:
        raise argparse.ArgumentTypeError(problems[0])
    return json.dumps(value, sort_keys=True)


def add_config_arguments(parser: argparse.ArgumentParser, settings_help: str | None, reads: str = "") -> None:
    """The one way every stage takes its config: config files as Snakemake merges them, or --settings.

    `settings_help`: what the stage's --settings mapping holds (None: no --settings, and config.yaml
    always comes first, as under Snakemake: plan); `reads`: which config keys the stage reads.
    """
    group = parser.add_argument_group("config")
    group.add_argument("--configfile", "--config", dest="configfiles", nargs="+", action="extend", default=None,
                       metavar="YAML",
                       help="config files merged in order over config.yaml, as Snakemake's --configfile (the "
                            "flag may repeat; --config is the older spelling)" + (f"; {reads}" if reads else ""))
    if settings_help is None:
        return
    group.add_argument("--no-default-config", action="store_true",
                       help="do not merge config.yaml first: the --configfile files are the whole config")
    group.add_argument("--settings", "--settings-json", dest="settings_json", type=settings_json, default=None,
                       metavar="MAPPING",
                       help=f"{settings_help}, as JSON or a YAML flow mapping (what the Snakemake rule passes); "
                            f"replaces the config files")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"has a duplicate key '{repeated[0]}'; give each key once")
    return dict(pairs)


def _refuse_constant(constant: str):
    raise ValueError(f"holds {constant}; numbers must be finite")
