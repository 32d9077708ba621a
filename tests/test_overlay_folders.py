"""Each config writes only under its own results folder: the paper (config.yaml) under results/ but
outside the overlays' folders, the demo under results/demo, the CPU study under results/cpu-study.
So a run of one never replans or overwrites another's files, whatever order they run in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OVERLAY_FOLDERS = ("results/demo/", "results/cpu-study/", "results/micro/")


def planned_paths(*configfile: str) -> list[str]:
    """Every output and log path of the whole plan (--forceall: whatever the checkout holds)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--workflow-profile", "none",
                             *configfile], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = []
    for line in result.stdout.splitlines():
        match = re.match(r"^\s+(output|log): (.+)$", line)
        if match:
            paths += match.group(2).split(", ")
    assert paths, result.stdout[-3000:]
    return paths


@pytest.mark.parametrize("overlay, folder", [("config/demo.yaml", "results/demo/"),
                                             ("config/cpu-study.yaml", "results/cpu-study/")])
def test_overlay_writes_only_into_its_folder(overlay, folder):
    outside = [path for path in planned_paths("--configfile", overlay) if not path.startswith(folder)]
    assert outside == []


def test_paper_config_stays_out_of_the_overlays_folders():
    paths = planned_paths()
    assert all(path.startswith("results/") for path in paths)
    assert [path for path in paths if path.startswith(OVERLAY_FOLDERS)] == []
    assert "results/report/index.md" in paths
