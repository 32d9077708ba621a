"""Loading the workflow's YAML config outside Snakemake, so every stage also runs on its own.

Snakemake merges `config.yaml` with `--configfile` overlays; `load_config` does the same merge
(later files win, mappings merged key by key) so `python -m pipeline <stage> --config ...` sees
exactly what the rule would have passed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"


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
    """Read and merge YAML config files in order (default: the repository's config.yaml)."""
    paths = list(paths) if paths else [DEFAULT_CONFIG]
    config: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"config file {path} does not exist; pass an existing YAML file "
                                f"(the repository's defaults are in {DEFAULT_CONFIG}).")
        try:
            layer = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise PipelineError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(layer, Mapping):
            raise PipelineError(f"config file {path} must hold a mapping at its top level.")
        config = deep_merge(config, layer)
    return config


def section(config: Mapping[str, Any], *keys: str) -> Any:
    """config[k1][k2]... with an error that names the missing key path."""
    node: Any = config
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            path = ".".join(keys[: depth + 1])
            raise PipelineError(f"config has no entry '{path}'; add it to config.yaml or an overlay.")
        node = node[key]
    return node
