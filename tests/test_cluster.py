"""The workflow on a real single-node SLURM cluster: tests/cluster/run_slurm_test.sh under pytest.

The script installs slurm-wlm and munge, starts daemons as root and takes minutes, so it runs only
when asked: RUN_SLURM_TEST=1 runs it, CI=true runs it unless RUN_SLURM_TEST=0. .ci/run sets
RUN_SLURM_TEST=1, so CI runs it as part of the test suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping

import pytest

SCRIPT = Path(__file__).resolve().parent / "cluster" / "run_slurm_test.sh"
TIMEOUT_SECONDS = 3600


def slurm_test_wanted(environ: Mapping[str, str] = os.environ) -> bool:
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
    process = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script's trap then stops the cluster's daemons.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"the SLURM test took over {TIMEOUT_SECONDS} s:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    assert output.rstrip().endswith(", 0 failed"), output[-6000:]
    print("\n".join(line for line in output.splitlines() if "PASS:" in line or "slurm-test:" in line))
