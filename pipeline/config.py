"""Loading and validating the workflow's YAML config, under Snakemake and outside it.

Snakemake merges `config.yaml` with `--configfile` overlays; `load_config` does the same merge
(later files win, mappings merged key by key) so `python -m pipeline <stage> --configfile ...` sees
exactly what the rule would have passed. Both paths read YAML with a loader that refuses
duplicate keys, check every number is finite and validate against the same JSON schema
(workflow/schemas/config.schema.yaml), each problem reported as one line.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import yaml

from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML lets the last one win)."""


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key '{key}' at line {line} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    first_lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<:` merge keys may legitimately override
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            continue  # construct_mapping below reports an unhashable key in its own words
        line = key_node.start_mark.line + 1
        if key in first_lines:
            raise _DuplicateKeyError(key, line, first_lines[key])
        first_lines[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml_text(text: str) -> Any:
    """YAML (or JSON) text from a command line, with the same duplicate-key check as files."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as err:
        raise PipelineError(f"{err}; give each key once") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as a mapping; duplicate keys, bad YAML or a non-mapping are a PipelineError."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} does not exist; pass an existing YAML file "
                            f"(the repository's defaults are in {DEFAULT_CONFIG}).")
    try:
        layer = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise PipelineError(f"config file {path} is not UTF-8 text (byte {err.start} cannot be decoded); "
                            f"save it as UTF-8.") from None
    except _DuplicateKeyError as err:
        raise PipelineError(f"config file {path}: key '{err.key}' appears twice (lines {err.first_line} and "
                            f"{err.line}); keep one of them.") from None
    except yaml.YAMLError as err:
        # PyYAML's messages span several lines (with a caret drawing); keep the first problem.
        where = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise PipelineError(f"config file {path} is not valid YAML: {problem}{at}.") from None
    if not isinstance(layer, Mapping):
        raise PipelineError(f"config file {path} must hold a mapping at its top level.")
    return dict(layer)


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `overlay` into a copy of `base`: mappings recursively, everything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(paths: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Read, merge and validate YAML config files in order (default: the repository's config.yaml).

    The merged config may be partial (a stage needs only its own sections), so the schema's
    required keys are not demanded here; everything present must be valid.
    """
    paths = list(paths) if paths else [DEFAULT_CONFIG]
    config: dict[str, Any] = {}
    for path in paths:
        config = deep_merge(config, read_yaml(path))
    problems = validation_problems(config, complete=False)
    if problems:
        files = ", ".join(map(str, paths))
        raise PipelineError(f"invalid config ({files}): " + "; ".join(problems))
    return config


def section(config: Mapping[str, Any], *keys: str) -> Any:
    """config[k1][k2]... with an error that names the missing key path."""
    node: Any = config
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            path = ".".join(keys[: depth + 1])
            if keys[0] == "datasets" and depth == 1:
                raise PipelineError(
                    f"dataset '{key}' is not declared: add an entry datasets.{key} (kind, channels, source, "
                    f"resolution, preset, batch_size, random_flip) to config.yaml or to an overlay config "
                    f"file you pass; see the README's 'Add a dataset'.")
            raise PipelineError(f"config has no entry '{path}'; add it to config.yaml or an overlay.")
        node = node[key]
    return node


# ------------------------------------------------------------------------------------------
# Validation: finite numbers and the JSON schema, one line per problem.

def nonfinite_problems(value: Any, path: str = "") -> list[str]:
    """Every NaN or infinity in a config tree (JSON schema bounds let YAML's .nan and .inf through)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or '(top level)'} = {value}: numbers must be finite; write a finite value"]
    if isinstance(value, Mapping):
        return [p for key, item in value.items() for p in nonfinite_problems(item, _join(path, key))]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in nonfinite_problems(item, f"{path}[{i}]")]
    return []


@functools.lru_cache(maxsize=1)
def schema_document() -> dict[str, Any]:
    """workflow/schemas/config.schema.yaml, read once."""
    return yaml.safe_load(SCHEMA.read_text())


@functools.lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema  # 0.15 s to import: paid only by runs that validate a config

    schema = schema_document()
    return jsonschema.validators.validator_for(schema)(schema)


def schema_problems(config: Mapping[str, Any], complete: bool = True) -> list[str]:
    """Schema violations as one line each: the key, its value and the rule it breaks.

    `complete=False` skips missing required keys (a stage's partial config), nothing else.
    """
    from jsonschema.exceptions import best_match  # see _schema_validator

    problems = []
    for error in sorted(_schema_validator().iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        if error.context:  # anyOf/oneOf/allOf: the most specific sub-error explains it best
            error = best_match([error, *error.context])
        if error.validator == "required" and not complete:
            continue
        problems.append(_describe(error))
    return problems


def _describe(error) -> str:
    path = ""
    for part in error.absolute_path:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    where = path or "(top level)"
    if error.validator == "additionalProperties":
        named = error.schema.get("properties") or {}
        patterns = error.schema.get("patternProperties") or {}
        unexpected = [str(key) for key in error.instance
                      if key not in named and not any(re.search(p, str(key)) for p in patterns)]
        allowed = ", ".join(sorted(named)) or " or ".join(patterns)
        return f"{where}: unknown key(s) {', '.join(unexpected)}; allowed: {allowed}"
    if error.validator == "not" and "required" in error.validator_value:
        return f"{where}: may not hold {' and '.join(error.validator_value['required'])} together"
    # jsonschema's own wording names the value and the rule ("'mnist' is not one of [...]").
    return f"{where}: {_short(error.message, limit=200)}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_problems(config: Mapping[str, Any], complete: bool = True) -> list[str]:
    """NaN/infinities first (the schema's bounds say odd things about them), else schema violations."""
    return nonfinite_problems(config) or schema_problems(config, complete=complete)

