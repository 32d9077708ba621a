"""bench/gpu_check.py on the CPU: its dry run (plan, CPU smoke, schema check) and its refusal
to start without CUDA, so the GPU check cannot rot between the rare sessions with a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_plans_every_step_and_writes_a_valid_result(tmp_path):
    gpu_check = load_script()
    result = run_script(tmp_path, "--dry-run", "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "matches the schema" in result.stdout
    data = json.loads((tmp_path / "out" / "dry-run.json").read_text())
    jsonschema.validate(data, gpu_check.JSON_SCHEMA)
    log = (tmp_path / "out" / "dry-run.log").read_text()
    for name, limit, _ in gpu_check.STEPS:
        assert f"plan: {name}" in log and f"limit {limit:>4} s" in log

    steps = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == [name for name, _, _ in gpu_check.STEPS]
    for name, step in steps.items():
        assert step["status"] == ("ok" if name in gpu_check.DRY_RUN_STEPS else "planned"), name
    assert steps["environment"]["results"]["torch"] == torch.__version__
    smoke = steps["presets"]["results"]
    for recipe in gpu_check.RECIPES:
        measured = smoke[f"train/tiny/{recipe}/fp32"]
        assert measured["images_per_second"] > 0 and measured["batch"] == 2
    assert smoke["ratio/tiny/fp32/sam_over_adam"] > 1  # SAM takes two gradients per step
    assert smoke["sample/tiny/T2"]["images_per_second"] > 0
    assert smoke["numerics/tiny/tf32_vs_fp32"]["eps_rel_diff"] == 0  # TF32 acts on CUDA only
    assert 0 < smoke["numerics/tiny/bf16_vs_fp32"]["eps_rel_diff"] < 0.1
    compiled = steps["forward_compile"]["results"]["forward_compile/tiny/T2"]
    assert compiled["batch"] == 2 and compiled["compile_seconds"] > 0 and compiled["speedup"] > 0
    numerics = steps["cuda_numerics"]["results"]
    assert numerics["cuda_numerics/tiny/pipeline"]["deterministic"]
    assert not numerics["cuda_numerics/tiny/torch_default"]["deterministic"]
    assert all(m["two_runs_bit_identical"] and m["images_per_second"] > 0 for m in numerics.values())
    ddp = steps["ddp_nccl"]["results"]["ddp/world1"]
    assert ddp["backend"] == "gloo" and ddp["bit_identical"] and ddp["loss_one_process"] == ddp["loss_ddp_rank0"]
    # Two gloo processes run the train stage's step under DDP: the same trajectory up to summation order.
    ddp = steps["ddp_nccl"]["results"]["ddp/world2"]
    assert ddp["backend"] == "gloo" and ddp["same_trajectory"] and ddp["weights_apart_over_travelled"] < 1e-2


def test_schema_rejects_a_train_measurement_without_its_rate():
    gpu_check = load_script()
    run = gpu_check.Run(Path("unused"), 480, dry_run=True)
    run.step("presets")["results"]["train/cifar10/adam/fp32"] = {"batch": 128, "paper_batch": 128}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(run.result, gpu_check.JSON_SCHEMA)


def test_plan_table_is_parsed_per_rule():
    gpu_check = load_script()
    table = ("all jobs of the plan, costed with calibration-cuda.json (H200, torch 2.14.1, 16 thread(s), ...)\n"
             "rule                  jobs  device-h  share   longest job     runtime   peak MB  mem_mb\n"
             "train                   54  12345.67  91.2%   2d 3:04:05  7d 0:00:00!     1234   16000\n"
             "sample                 540   1000.50   7.4%       0:01:37  1d 0:00:00       573    8000\n"
             "total                  594  13346.17\n"
             "warning: train: the longest job (2d 3:04:05) exceeds its runtime resource")
    rules, total = gpu_check.parse_estimate(table)
    assert rules == {"train": {"jobs": 54, "gpu_hours": 12345.67}, "sample": {"jobs": 540, "gpu_hours": 1000.5}}
    assert total == 13346.17


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_stops_before_any_work(tmp_path):
    result = run_script(tmp_path, "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "torch sees no CUDA device here; on a CPU run `python bench/gpu_check.py --dry-run`" in result.stderr
    assert not (tmp_path / "out").exists()
