"""Artifact I/O: atomic writes and provenance."""

from pipeline.io.atomic import atomic_path
from pipeline.io.provenance import provenance, write_attrs

__all__ = ["atomic_path", "provenance", "write_attrs"]
