"""The workflow on a real single-node SLURM cluster: tests/cluster/run_slurm_test.sh under pytest.

The script installs slurm-wlm and munge, starts daemons as root and takes minutes, so it runs only
when asked: RUN_SLURM_TEST=1 runs it, CI=true runs it unless RUN_SLURM_TEST=0. .ci/run sets
RUN_SLURM_TEST=0 for pytest and calls the script itself right after, so CI runs it exactly once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cluster" / "run_slurm_test.sh"


def slurm_test_wanted(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """RUN_SLURM_TEST decides when set (1 = run); otherwise CI=true runs the test."""
    flag = environ.get("RUN_SLURM_TEST")
    if flag is not None:
        return flag == "1"
    return environ.get("CI") == "true"


def test_switch_follows_run_slurm_test_then_ci():
    assert slurm_test_wanted({"RUN_SLURM_TEST": "1"})
    assert slurm_test_wanted({"CI": "true"})
    assert not slurm_test_wanted({"CI": "true", "RUN_SLURM_TEST": "0"})
    assert not slurm_test_wanted({})


@pytest.mark.skipif(not slurm_test_wanted(),
                    reason="starts a SLURM cluster as root and takes minutes: set RUN_SLURM_TEST=1 "
                           "(CI=true runs it unless RUN_SLURM_TEST=0)")
def test_workflow_runs_on_single_node_slurm():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "slurm-test:" in output and ", 0 failed" in output, output[-6000:]
