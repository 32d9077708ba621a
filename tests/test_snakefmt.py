"""The Snakefile and the rule files are as snakefmt formats them (the `snakemake --lint` check is in
tests/test_workflow.py). snakefmt comes with the `test` extra that .ci/install installs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_snakefmt_check_is_clean():
    pytest.importorskip("snakefmt", reason="snakefmt missing: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"run `snakefmt Snakefile workflow/rules` to format:\n"
                                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
