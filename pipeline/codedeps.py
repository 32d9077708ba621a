"""The source files a stage's results depend on, traced from its imports (no torch, no import).

The Snakefile lists each rule's science code as inputs, so that editing a file reruns exactly the
rules whose stage imports it. The list is derived here from the import statements of the stage
module (read with `ast`, never executed) rather than written by hand, so it cannot drift when a
stage starts or stops using a module. Shared plumbing (command line, errors, artifact I/O, config
loading, paths, device choice) is left out on purpose: a logging or message edit must not rerun
the study; the resolved settings a job receives are its params, which Snakemake tracks itself.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent

# Modules (or packages, with everything under them) whose edits never change a result.
PLUMBING = (
    "pipeline.__main__",
    "pipeline.cli",
    "pipeline.arguments",
    "pipeline.progress",
    "pipeline.errors",
    "pipeline.io",
    "pipeline.config",
    "pipeline.settings",
    "pipeline.layout",
    "pipeline.device",
    "pipeline.codedeps",
    "pipeline.cost",
    "pipeline.launch",
    "pipeline.training.signals",  # how a run stops on SIGTERM, not what it computes
)


def is_plumbing(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PLUMBING)


def module_file(module: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The file of a `pipeline.*` module (a package's __init__.py), or None if it is not one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, root: Path) -> set[str]:
    """Every `pipeline.*` module named by an import statement of the file, lazy imports included."""
    module = _module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pipeline.x import y`: y may be a submodule or a name defined in x.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE}


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


@lru_cache(maxsize=None)
def _closure(start: str, root: Path) -> tuple[str, ...]:
    seen: set[Path] = set()
    pending = [start]
    while pending:
        name = pending.pop()
        for module in _with_parents(name):
            if is_plumbing(module):
                continue
            path = module_file(module, root)
            if path is None or path in seen:
                continue
            seen.add(path)
            pending.extend(_imported_modules(path, root))
    return tuple(sorted(str(p) for p in seen))


def source_files(*modules: str, root: Path | str = PACKAGE_DIR) -> list[str]:
    """The science source files the given modules import, transitively, themselves included."""
    root = Path(root).resolve()
    missing = [m for m in modules if module_file(m, root) is None]
    if missing:
        raise ValueError(f"no such module under {root}: {', '.join(missing)}")
    files: set[str] = set()
    for module in modules:
        files.update(_closure(module, root))
    return sorted(files)
