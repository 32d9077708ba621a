"""Artifact I/O: atomic writes and provenance."""

from pipeline.io.atomic import atomic_path, atomic_torch_save
from pipeline.io.provenance import provenance, write_attrs

__all__ = ["atomic_path", "atomic_torch_save", "provenance", "write_attrs"]
