"""Provenance attributes stored with every artifact: what made it, from which settings."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import yaml

PACKAGE = "flatness-pipeline"
# Attributes that differ between two identical runs (where, when, how long). They describe the
# run, not the artifact: `artifact_sha256`, the hash a downstream file records, leaves them out.
VOLATILE_ATTRS = frozenset({"host", "created_utc", "wall_seconds", "wall_time_s", "sampling_seconds"})


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def git_revision() -> str:
    """The checkout's commit (with '-dirty' when it has local changes), or 'none'."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "none"


def provenance(stage: str, settings: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """Attributes for an artifact: stage, settings as YAML, versions, git revision, time, host."""
    import torch

    attrs = {
        "stage": stage,
        "settings_yaml": yaml.safe_dump(to_plain(settings or {}), sort_keys=True),
        "package_version": package_version(),
        "git_revision": git_revision(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "host": platform.node(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in extra.items():
        attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(to_plain(value))
    return attrs


def stable_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """`attrs` without the volatile ones: what a downstream file may copy of its input's attributes
    and still be the same for two identical runs."""
    return {key: value for key, value in attrs.items() if key not in VOLATILE_ATTRS}


def write_attrs(h5obj: Any, attrs: Mapping[str, Any]) -> None:
    """Store a flat mapping as HDF5 attributes (values must already be scalars or strings)."""
    for key, value in attrs.items():
        h5obj.attrs[key] = value


def to_plain(value: Any) -> Any:
    """Turn tuples, paths and numpy scalars into YAML/JSON-safe Python values."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
