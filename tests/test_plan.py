"""The cost estimate (`python -m pipeline plan`): dry-run parsing, exact totals on a fixture plan
with fixed timings, and a real calibration on the tiny preset (seconds)."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.config import deep_merge, load_config
from pipeline.cost.dryrun import Job, parse_dry_run
from pipeline.cost.model import Timings, estimate, job_units, total_seconds
from pipeline.errors import PipelineError
from pipeline.stages import plan

DRY_RUN = """\
Building DAG of jobs...
[Wed Nov 25 19:07:11 2026]
rule train:
    input: results/demo/fashion_mnist/data.h5
    output: results/demo/fashion_mnist/sam_rho0.01/seed0/weights_raw.pt
    jobid: 5
    reason: Missing output files: results/demo/fashion_mnist/sam_rho0.01/seed0/weights_raw.pt
    wildcards: dataset=fashion_mnist, recipe=sam_rho0.01, seed=0
    threads: 1
    resources: tmpdir=/tmp, mem_mb=16000, mem_mib=15259, runtime=10080, gpu=1, nodes=1
[Wed Nov 25 19:07:11 2026]
localrule all:
    input: results/demo/report/index.md
    jobid: 0
    resources: tmpdir=/tmp
Job stats:
job      count
-----  -------
train        1
all          1
total        2
"""


def test_dry_run_blocks_give_rule_wildcards_and_resources():
    jobs = parse_dry_run(DRY_RUN)
    assert [j.rule for j in jobs] == ["train", "all"]
    assert jobs[0].wildcards == {"dataset": "fashion_mnist", "recipe": "sam_rho0.01", "seed": "0"}
    assert jobs[0].resources["runtime"] == "10080" and jobs[0].resources["mem_mb"] == "16000"
    assert jobs[1].wildcards == {}


@pytest.fixture(scope="module")
def demo_config():
    return load_config(["config.yaml", "config/demo.yaml"])


def test_fixture_plan_gives_exact_totals(demo_config):
    """Known counts x fixed timings: every number is checked by hand below."""
    m = "fmnist16/16px/c1"
    timings = Timings(startup_seconds=5.0, seconds={
        f"train/{m}/b64/adamw": 0.25, f"train/{m}/b64/adamw+sam": 0.5,
        f"sample/{m}/b250": 0.001, f"sample/{m}/b64": 0.002,
        f"loss/{m}/b256": 0.001, f"hvp/{m}/b32": 0.01, f"loss/{m}/b32": 0.004,
        "extract/effnet-lite0-32px/16px/c1": 0.002, "fid_fixed/effnet-lite0-32px/n500": 7.0,
    }, peak_mb={f"train/{m}/b64/adamw+sam": 900.0, f"sample/{m}/b250": 600.0})
    jobs = [
        Job("train", {"dataset": "fashion_mnist", "recipe": "adm", "seed": "0"}, {"runtime": "10080", "mem_mb": "16000"}),
        Job("train", {"dataset": "fashion_mnist", "recipe": "sam_rho0.01", "seed": "0"}, {"runtime": "3", "mem_mb": "800"}),
        Job("sample", {"dataset": "fashion_mnist", "steps": "100"}, {"runtime": "1440"}),
        Job("fid", {"dataset": "fashion_mnist"}, {}),
        Job("metric", {"dataset": "fashion_mnist", "metric": "lpf"}, {}),
        Job("metric", {"dataset": "fashion_mnist", "metric": "hessian"}, {}),
        Job("metric", {"dataset": "fashion_mnist", "metric": "exposure"}, {}),
        Job("quantize", {"precision": "int8"}, {}),
        Job("all", {}, {}),
    ]
    # demo: 700 steps; 500 samples; LPF sigmas {0.01, 0.001} x 2 scalings x 8 draws on 256 triples;
    # Hessian 2 x 20 products over 32 triples (+ one loss over them); exposure 2 x 64 images x (20 + 100).
    assert job_units(jobs[4], demo_config) == {f"loss/{m}/b256": (1 + 2 * 2 * 8) * 256}
    assert job_units(jobs[5], demo_config) == {f"hvp/{m}/b32": 2 * 20 * 32, f"loss/{m}/b32": 32}
    assert job_units(jobs[6], demo_config) == {f"sample/{m}/b64": 2 * 64 * 120}
    costs = {c.rule: c for c in estimate(jobs, demo_config, timings)}
    assert costs["train"].jobs == 2
    assert costs["train"].seconds == pytest.approx((5 + 700 * 0.25) + (5 + 700 * 0.5))
    assert costs["train"].longest_seconds == pytest.approx(5 + 350.0)
    assert costs["train"].runtime_minutes == 3 and costs["train"].mem_mb == 800  # the tightest job's
    assert costs["train"].peak_mb == 900.0
    assert costs["sample"].seconds == pytest.approx(5 + 500 * 100 * 0.001)
    assert costs["fid"].seconds == pytest.approx(5 + 500 * 0.002 + 7.0)
    assert costs["metric"].seconds == pytest.approx(
        (5 + 33 * 256 * 0.001) + (5 + 1280 * 0.01 + 32 * 0.004) + (5 + 15360 * 0.002))
    assert costs["quantize"].seconds == pytest.approx(5.0)
    assert "all" not in costs
    assert total_seconds(costs.values()) == pytest.approx(math.fsum(c.seconds for c in costs.values()))
    assert total_seconds(costs.values()) == pytest.approx(180 + 355 + 55 + 13 + 13.448 + 17.928 + 35.72 + 5)
    text = plan.format_estimate(list(costs.values()), True, {
        "device_name": "test", "torch": "x", "threads": 1, "load_average_before": [0.0],
        "startup_seconds": 5.0}, plan.Path("calibration.json"))
    # The SAM run (355 s) outlasts its 3-minute budget and its measured 900 MB its 800 MB.
    assert "warning: train: the longest job (0:05:55) exceeds its runtime resource" in text
    assert "warning: train: measured peak 900 MB exceeds mem_mb 800" in text
    assert "wall-clock" not in text  # no side-by-side measurement, no local wall-clock claim
    # With one: total x slowdown / copies (675.1 s x 1.5 / 2 = 506.3 s).
    side = {"units": {"train/fmnist16/16px/c1/b64/adamw": 1.6, "sample/fmnist16/16px/c1/b500": 1.4}, "copies": 2,
            "slowdown": 1.5}
    assert plan.wall_clock_lines(total_seconds(costs.values()), {"side_by_side": side}) == [
        "on this machine, 2 one-thread jobs at a time (--cores 2), each 1.50x slower than alone (the mean of "
        "train/fmnist16/16px/c1/b64/adamw 1.60x, sample/fmnist16/16px/c1/b500 1.40x): about 0:08:26 of wall-clock"]


def test_missing_timing_names_the_unit_and_the_fix(demo_config):
    job = Job("train", {"dataset": "fashion_mnist", "recipe": "fsgld_adam", "seed": "0"}, {})
    with pytest.raises(PipelineError, match=r"no timing for train/fmnist16/16px/c1/b64/adamw\+fsgld1; rerun"):
        estimate([job], demo_config, Timings(5.0, {}))


def test_missing_calibration_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no calibration at .* --calibrate"):
        plan.read_calibration(tmp_path / "none.json")


def test_calibration_on_the_tiny_preset(tmp_path, demo_config, monkeypatch):
    """Every kind of model work unit, each timed in its own process, stored and read back."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = deep_merge(demo_config, {"datasets": {"fashion_mnist": {"preset": "tiny", "batch_size": 4}},
                                      "sampling": {"batch_size": 4},
                                      "metrics": {"hessian": {"batch": 2, "max_iter": 1}}})
    jobs = [Job("train", {"dataset": "fashion_mnist", "recipe": "sam_rho0.01", "seed": "0"}, {"mem_mb": "16000"}),
            Job("sample", {"dataset": "fashion_mnist", "steps": "20"}, {}),
            Job("metric", {"dataset": "fashion_mnist", "metric": "hessian"}, {})]
    calibration = plan.calibrate(jobs, config, "cpu", max_batch=4, repeats=1, log=lambda line: None)
    path = tmp_path / "cost" / "calibration-cpu.json"
    plan.write_calibration(path, calibration)
    stored = json.loads(path.read_text())
    assert set(stored["units"]) == {"train/tiny/16px/c1/b4/adamw+sam", "sample/tiny/16px/c1/b4",
                                    "hvp/tiny/16px/c1/b2", "loss/tiny/16px/c1/b2"}
    for unit in stored["units"].values():
        assert unit["seconds"] > 0 and unit["peak_mb"] > 100  # torch alone takes more than 100 MB
    assert stored["threads"] == 1 and len(stored["load_average_before"]) == 3 and stored["startup_seconds"] > 0
    side = stored["side_by_side"]  # one copy per core of a training and a sampling unit, at once
    if (os.cpu_count() or 1) > 1:
        assert set(side["units"]) == {"train/tiny/16px/c1/b4/adamw+sam", "sample/tiny/16px/c1/b4"}
        assert side["copies"] == os.cpu_count() and side["slowdown"] == pytest.approx(
            sum(side["units"].values()) / 2) and side["slowdown"] > 0
    # A forked job skips the imports a process of its own pays (CPU seconds: load does not inflate them).
    assert stored["startup_seconds"] < stored["startup_own_process_seconds"]
    costs = estimate(jobs, config, Timings.from_calibration(plan.read_calibration(path)))
    assert {c.rule for c in costs} == {"train", "sample", "metric"}
    assert all(c.seconds > stored["startup_seconds"] for c in costs)
