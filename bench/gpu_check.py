"""The pipeline on a CUDA machine in one command: each step bounded, the whole run within a budget.

    python bench/gpu_check.py [--budget-seconds 480] [--out-dir docs/gpu-check]
    python bench/gpu_check.py --dry-run [--out-dir DIR]    # on a CPU: the plan, a smoke, a format check
    python bench/gpu_check.py --steps demo --budget-seconds 840  # later: only some steps

Steps, in order of value (each its own process group, killed at its limit; a step starts only
with at least MIN_STEP_SECONDS of the budget left and gets no more than what is left):

  environment     device, torch / CUDA / cuDNN / NCCL versions, GPU and CPU counts
  cuda_tests      pytest -m cuda: the test suite's CUDA cases
  cuda_numerics   cifar10's Adam step under the pipeline's CUDA numerics (deterministic
                  kernels, no TF32), plain fp32 and torch's default: images/s, and whether two
                  runs from the same weights and batches end bit-identical
  presets         cifar10 and adm64: bf16 and TF32 against fp32 on one batch (loss, eps);
                  train-step images/s at the paper's batches for Adam, SAM and fSGLD in fp32,
                  TF32 and bf16 autocast, peak memory, SAM/Adam and fSGLD/Adam; sampling
                  images/s at T' = 20 and 100
  forward_compile cifar10's sampling loop at T' = 20 with the forward compiled as the pipeline
                  compiles it, against eager: speed-up, compile seconds, the forward work above
                  which compiling pays (config forward_compile.min_gflop.cuda)
  ddp_nccl        DDP over NCCL with world size 1 (and 2 with two GPUs) against one process
  plan_calibrate  plan --calibrate --device cuda for config.yaml: GPU-hours per rule
  demo            the demo DAG with device: cuda and --cores = CPU count: wall time

Writes <out-dir>/<device>.json (the JSON_SCHEMA below; rewritten whenever a step reports a
measurement, so a run cut short keeps what it measured) and <device>.log (every step's own output,
as it goes). Nothing here resets or reconfigures the GPU. Without CUDA (and without --dry-run) it
stops before any work. --dry-run writes dry-run.json and .log: every step listed as planned, the
environment step, CPU smokes of cuda_numerics, presets and forward_compile, and ddp_nccl's code
over gloo at world sizes 1 and 2 run (each with DRY_RUN_LIMIT), and the result checked against the
schema.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
FORMAT = "gpu-check/1"
MIN_STEP_SECONDS = 20
# (name, time limit in seconds, what it measures): the order they run in.
STEPS: list[tuple[str, int, str]] = [
    ("environment", 30, "device, torch, CUDA, cuDNN and NCCL versions"),
    ("cuda_tests", 100, "pytest -m cuda (device placement, dtypes, sampler, metrics, resume)"),
    ("cuda_numerics", 90, "cifar10 training: deterministic fp32 (the pipeline's) vs fp32 and vs torch's default; bit-identity"),
    ("presets", 180, "cifar10/adm64: bf16 and TF32 vs fp32; train images/s, peak memory; sampling images/s"),
    ("forward_compile", 150, "cifar10 sampling forward compiled vs eager: speed-up, compile seconds, break-even"),
    ("ddp_nccl", 45, "DDP over NCCL, world size 1 (and 2 with two GPUs) vs one process"),
    ("plan_calibrate", 150, "plan --calibrate on CUDA for config.yaml: GPU-hours per rule"),
    ("demo", 600, "the demo DAG with device: cuda, --cores = CPU count: wall time"),
]
DRY_RUN_LIMIT = 150
DRY_RUN_STEPS = ("environment", "cuda_numerics", "presets", "forward_compile", "ddp_nccl")  # the steps a dry run runs on the CPU
STATUSES = ["planned", "ok", "failed", "timeout", "skipped"]
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "dry_run", "budget_seconds", "device", "started", "updated", "steps"],
    "properties": {
        "format": {"const": FORMAT},
        "dry_run": {"type": "boolean"},
        "budget_seconds": {"type": "number", "exclusiveMinimum": 0},
        "device": {"type": "string", "minLength": 1},
        "started": {"type": "string"}, "updated": {"type": "string"},
        "steps": {"type": "array", "minItems": len(STEPS), "maxItems": len(STEPS), "items": {
            "type": "object",
            "required": ["name", "limit_seconds", "what", "status", "seconds", "results", "error"],
            "properties": {
                "name": {"enum": [name for name, _, _ in STEPS]},
                "limit_seconds": {"type": "number", "exclusiveMinimum": 0},
                "what": {"type": "string"},
                "status": {"enum": STATUSES},
                "seconds": {"type": ["number", "null"], "minimum": 0},
                "results": {"type": "object", "patternProperties": {
                    # One train-step measurement: images/s and peak memory at a batch, or why not.
                    "^train/": {"type": "object", "oneOf": [
                        {"required": ["images_per_second", "peak_memory_mb", "batch", "paper_batch"],
                         "properties": {"images_per_second": {"type": "number", "exclusiveMinimum": 0},
                                        "peak_memory_mb": {"type": ["number", "null"], "minimum": 0},
                                        "batch": {"type": "integer", "minimum": 1},
                                        "paper_batch": {"type": "integer", "minimum": 1}}},
                        {"required": ["error"], "properties": {"error": {"type": "string"}}}]},
                    "^sample/": {"type": "object", "required": ["images_per_second", "batch", "steps"]},
                    "^ratio/": {"type": "number", "exclusiveMinimum": 0},
                    "^numerics/": {"type": "object", "required": ["loss_abs_diff", "eps_rel_diff"]},
                    "^ddp/world": {"type": "object", "oneOf": [
                        {"required": ["backend", "bit_identical", "weights_apart_over_travelled", "same_trajectory"]},
                        {"required": ["skipped"]}]},
                }},
                "error": {"type": ["string", "null"]},
            }}},
    },
}


# ------------------------------------------------------------------------------------------
# The driver: torch-free, so it neither creates a CUDA context nor holds GPU memory itself.

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Run:
    """The result JSON and the log, both written as the run goes."""

    def __init__(self, out_dir: Path, budget: float, dry_run: bool):
        self.out_dir, self.dry_run, self.begin = out_dir, dry_run, time.monotonic()
        self.pending_log: list[str] = []  # lines before the device (and so the file names) is known
        self.log_path: Path | None = None
        self.result = {"format": FORMAT, "dry_run": dry_run, "budget_seconds": budget,
                       "device": "dry-run" if dry_run else "cuda-unknown", "started": now(),
                       "updated": now(), "steps": [
                           {"name": name, "limit_seconds": limit, "what": what, "status": "planned",
                            "seconds": None, "results": {}, "error": None} for name, limit, what in STEPS]}

    def step(self, name: str) -> dict[str, Any]:
        return next(s for s in self.result["steps"] if s["name"] == name)

    def name_files(self, device: str) -> None:
        self.result["device"] = device
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / f"{device}.log"
        self.log_path.write_text("".join(self.pending_log))

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.result['device']}.json"

    def log(self, line: str) -> None:
        text = f"[{now()}] {line}\n"
        print(text, end="", flush=True)
        if self.log_path is None:
            self.pending_log.append(text)
        else:
            with open(self.log_path, "a") as f:
                f.write(text)

    def save(self) -> None:
        if self.log_path is None:
            return
        self.result["updated"] = now()
        tmp = self.json_path.with_name(f".{self.json_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        tmp.replace(self.json_path)

    def left(self) -> float:
        return self.result["budget_seconds"] - (time.monotonic() - self.begin)


def read_records(path: Path) -> dict[str, Any]:
    """The step's measurements so far (a last line cut by a kill is dropped)."""
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                results[record["key"]] = record["value"]
    return results


def run_step(run: Run, name: str, extra: list[str]) -> None:
    """Run one step in its own process group, killed at min(its limit, the budget left)."""
    step = run.step(name)
    # A dry run's steps are CPU smokes on a possibly shared machine: each gets DRY_RUN_LIMIT.
    limit = min(DRY_RUN_LIMIT if run.dry_run else step["limit_seconds"], run.left())
    if limit < MIN_STEP_SECONDS:
        step.update(status="skipped", error=f"{run.left():.0f} s of the budget left")
        run.log(f"{name}: skipped, {run.left():.0f} s of the budget left")
        run.save()
        return
    run.log(f"{name}: start, limit {limit:.0f} s ({step['what']})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    began, size = time.monotonic(), -1
    # Before the log file is named (the environment step), the step's output goes to this stdout.
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, \
            (open(run.log_path, "a") if run.log_path else contextlib.nullcontext()) as log_file:
        records = Path(tmp) / f"{name}.jsonl"
        command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--records", str(records), *extra]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    code = None
                if records.exists() and records.stat().st_size != size:
                    size = records.stat().st_size
                    step["results"] = read_records(records)
                    run.save()
                if time.monotonic() - began > limit:
                    break
        finally:  # at the limit, and when this driver is interrupted or terminated
            if code is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and everything it started
                proc.wait()
        step["results"] = read_records(records)
    step["seconds"] = round(time.monotonic() - began, 1)
    if code is None:
        step.update(status="timeout", error=f"killed at its limit of {limit:.0f} s")
    elif code != 0:
        step.update(status="failed", error=f"exit status {code}; see the log")
    else:
        step["status"] = "ok"
    run.log(f"{name}: {step['status']} after {step['seconds']} s, {len(step['results'])} measurement(s)")
    run.save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=480, help="wall time for all steps together")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default docs/gpu-check (a dry run: a new temporary folder, so docs/ holds GPU runs only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: list the steps, run a CPU smoke of the presets step, check the JSON")
    parser.add_argument("--steps", nargs="+", choices=[name for name, _, _ in STEPS[1:]],
                        help="run only these steps (after environment), e.g. `--steps demo` in a second session")
    parser.add_argument("--step", choices=[name for name, _, _ in STEPS], help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        WORKERS[args.step](Recorder(args.records), args.dry_run)
        return 0
    if args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be positive, got {args.budget_seconds}")

    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-")) if args.dry_run
                               else REPO / "docs" / "gpu-check")
    run = Run(out_dir, args.budget_seconds, args.dry_run)
    # SIGTERM (a session's time running out) unwinds like Ctrl-C: the running step is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for name, limit, what in STEPS:
        run.log(f"plan: {name:<15} limit {limit:>4} s  {what}")
    if args.dry_run:
        run.name_files("dry-run")
        # The presets step is the smallest that measures: its CPU smoke; ddp_nccl's code over gloo.
        for name in DRY_RUN_STEPS:
            run_step(run, name, ["--dry-run"])
        return check_dry_run(run)

    # CUDA first: without it nothing else may start.
    run_step(run, "environment", [])
    env = run.step("environment")["results"]
    if run.step("environment")["status"] != "ok":
        print("gpu_check: the environment step failed (its output is above); nothing else was started.",
              file=sys.stderr)
        return 1
    if not env.get("cuda_available"):
        print("gpu_check: torch sees no CUDA device here; on a CPU run `python bench/gpu_check.py --dry-run`.",
              file=sys.stderr)
        return 2
    device = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    # A partial rerun gets its own files rather than overwriting a full run's.
    run.name_files(device + "".join(f"-{name}" for name in args.steps or []))
    run.save()
    for name, _, _ in STEPS[1:]:
        if args.steps and name not in args.steps:
            run.step(name).update(status="skipped", error="not in --steps")
            continue
        run_step(run, name, [])
    run.log(f"done in {time.monotonic() - run.begin:.0f} s of a {run.result['budget_seconds']:.0f} s budget; "
            f"wrote {run.json_path}")
    return 0


def check_dry_run(run: Run) -> int:
    import jsonschema

    result = json.loads(run.json_path.read_text())
    jsonschema.validate(result, JSON_SCHEMA)
    bad = [s["name"] for s in result["steps"] if s["name"] in DRY_RUN_STEPS and s["status"] != "ok"]
    if bad:
        run.log(f"dry run: step(s) {bad} did not finish; see {run.log_path}")
        return 1
    run.log(f"dry run: {run.json_path} matches the schema; the other steps need CUDA")
    return 0


# ------------------------------------------------------------------------------------------
# The steps, each run as `gpu_check.py --step NAME` in its own process.

class Recorder:
    """Appends one JSON line per measurement, flushed at once, for the driver to pick up."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, key: str, value: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
        print(f"  {key}: {json.dumps(value)}", flush=True)


def step_environment(record: Recorder, dry_run: bool) -> None:
    import torch

    record("torch", torch.__version__)
    record("cuda_available", torch.cuda.is_available())
    record("cpu_count", os.cpu_count())
    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    record("device_name", torch.cuda.get_device_name(0))
    record("device_count", torch.cuda.device_count())
    record("capability", f"{props.major}.{props.minor}")
    record("memory_gb", round(props.total_memory / 2**30, 1))
    record("cuda", torch.version.cuda)
    record("cudnn", torch.backends.cudnn.version())
    record("nccl", ".".join(map(str, torch.cuda.nccl.version())))
    record("bf16_supported", torch.cuda.is_bf16_supported())


def step_cuda_tests(record: Recorder, dry_run: bool) -> None:
    """pytest -m cuda, its counts recorded after every test (a run cut short keeps them)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    counts: dict[str, int] = {}
    failed: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        outcome = re.match(r"(tests/\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
        if outcome:
            counts[outcome[2].lower()] = counts.get(outcome[2].lower(), 0) + 1
            if outcome[2] in ("FAILED", "ERROR"):
                failed.append(outcome[1])
            record("counts", counts)
            record("failed", failed)
    code = proc.wait()
    if code != 0:
        raise SystemExit(code)


# The datasets whose presets and batches (config.yaml: cifar10 128, lsun_tower 256) are measured.
PAPER_DATASETS = ("cifar10", "lsun_tower")
SAMPLING_STEPS = (20, 100)
RECIPES = {"adam": "adm", "sam": "sam_rho0.1", "fsgld": "fsgld_adam"}
MODES = ("fp32", "tf32", "bf16")


def set_mode(mode: str) -> dict[str, bool]:
    """TF32 switched on (a global flag) only in 'tf32'; returns the mode's training.cuda settings
    for TrainingStep: bf16 autocast in 'bf16' (which TrainingStep applies on CUDA only)."""
    import torch

    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return {"bf16": mode == "bf16"}


def paper_model(preset: str):
    """The preset's UNet (RGB) and the training diffusion, as config.yaml has them."""
    from pipeline.config import load_config
    from pipeline.diffusion.gaussian import create_diffusion
    from pipeline.nn.presets import build_unet

    d = load_config([REPO / "config.yaml"])["training"]["diffusion"]
    diffusion = create_diffusion(steps=d["steps"], noise_schedule=d["noise_schedule"], learn_sigma=d["learn_sigma"])
    return build_unet(preset, learn_sigma=d["learn_sigma"]), diffusion


def seeded_model(preset: str, device):
    """The preset's UNet from seed 0 on `device`, its diffusion, a copy of its initial weights, and
    draw(batch): TrainingStep batches of uniform images and timesteps from one generator (seed 1)."""
    import torch

    torch.manual_seed(0)
    model, diffusion = paper_model(preset)
    model = model.to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (model.in_channels, model.image_size, model.image_size)
    g = torch.Generator().manual_seed(1)

    def draw(batch: int):
        x0 = torch.rand(batch, *shape, generator=g) * 2 - 1
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
        return uniform_batch(x0.to(device), t.to(device), torch.randn(x0.shape, generator=g).to(device))

    return model, diffusion, initial, draw


def paper_step(model, diffusion, recipe_name: str, device, procs, cuda):
    """The train stage's step (pipeline.training.step) for config.yaml's recipe over `model`.

    Call it as step(batch, step_index), batch = (x0, t, weights, noise, input_noise) as
    pipeline.training.draws.draw_step returns it; the timesteps are uniform (weights 1).
    """
    from pipeline.config import load_config
    from pipeline.diffusion.timestep_sampler import UniformSampler
    from pipeline.recipes import resolve_recipe
    from pipeline.training.optimizer import build_optimizer
    from pipeline.training.step import TrainingStep

    recipe = resolve_recipe(load_config([REPO / "config.yaml"]), recipe_name)
    return TrainingStep(model, build_optimizer(model, recipe, 0), diffusion, UniformSampler(diffusion.num_timesteps),
                        recipe.name, seed=0, device=device, procs=procs, cuda=cuda)


def uniform_batch(x0, t, noise):
    """(x0, t, noise) as TrainingStep's batch: uniform timesteps weigh 1, no input perturbation."""
    import torch

    return x0, t, torch.ones(t.shape, device=t.device), noise, None


def step_presets(record: Recorder, dry_run: bool) -> None:
    """On CUDA the paper's presets; in a dry run the tiny preset on the CPU, fp32, one timed step."""
    import torch

    from pipeline.config import load_config

    config = load_config([REPO / "config.yaml"])
    device = torch.device("cpu" if dry_run else "cuda")
    runs = [("tiny", 2)] if dry_run else [(config["datasets"][name]["preset"], config["datasets"][name]["batch_size"])
                                          for name in PAPER_DATASETS]
    for preset, paper_batch in runs:
        model, diffusion, initial, draw = seeded_model(preset, device)
        numerics(record, preset, model, diffusion, draw(2 if dry_run else 16))  # CPU: bf16 only differs
        for mode in ("fp32",) if dry_run else MODES:
            rates = {}
            for name, recipe in RECIPES.items():
                model.load_state_dict(initial)
                rate = train_rate(record, f"train/{preset}/{name}/{mode}", model, diffusion, recipe, draw,
                                  paper_batch, None if dry_run else mode, device)
                if rate:
                    rates[name] = rate
            for name in ("sam", "fsgld"):
                if name in rates and "adam" in rates:
                    # Step-time ratio: Adam's images/s over the recipe's.
                    record(f"ratio/{preset}/{mode}/{name}_over_adam", round(rates["adam"] / rates[name], 3))
        model.load_state_dict(initial)
        if dry_run:
            sample_rates(record, preset, model, (2,), 2, device)
        else:
            set_mode("fp32")
            sample_rates(record, preset, model, SAMPLING_STEPS, config["sampling"]["batch_size"], device)
        del model
        if not dry_run:
            torch.cuda.empty_cache()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def numerics(record, preset, model, diffusion, batch) -> None:
    """bf16 autocast and TF32 against fp32 on one batch, dropout off: loss and eps prediction.

    ADM zero-initialises the last layer of each block and the output, so an untrained model
    predicts eps = 0 exactly; those layers get random weights first (the caller reloads its own).
    """
    import torch

    x0, t, _, noise, _ = batch
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    model.eval()
    outputs = {}
    for mode in MODES:
        bf16 = set_mode(mode)["bf16"]  # on the CPU too: the dry run's bf16 differs from fp32
        with torch.no_grad(), torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model(diffusion.q_sample(x0, t, noise), t)[:, :x0.shape[1]].float()
            loss = diffusion.training_losses(model, x0, t, noise)["loss"].float().mean()
        outputs[mode] = (float(loss), eps)
    loss32, eps32 = outputs["fp32"]
    for mode in ("tf32", "bf16"):
        loss, eps = outputs[mode]
        record(f"numerics/{preset}/{mode}_vs_fp32", {
            "loss_fp32": loss32, "loss": loss, "loss_abs_diff": abs(loss - loss32),
            "eps_rel_diff": float((eps - eps32).norm() / eps32.norm()),
            "eps_max_abs_diff": float((eps - eps32).abs().max())})
    model.train()


def train_rate(record, key, model, diffusion, recipe, draw, paper_batch, mode, device,
               timed_steps: int = 3) -> float | None:
    """Images/s of the train stage's step at the paper's batch (halved until one GPU holds it),
    and peak memory.

    `mode` None: the CPU smoke (fp32, one timed step).
    """
    import torch

    from pipeline import distributed

    cuda = device.type == "cuda"
    cuda_settings = set_mode(mode) if mode else {}
    timed_steps = timed_steps if cuda else 1
    batch = paper_batch
    while batch >= 1:
        try:
            step = paper_step(model, diffusion, recipe, device, distributed.Processes(), cuda_settings)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            data = draw(batch)
            step(data, 0)  # warm-up
            synchronize(device)
            began = time.perf_counter()
            for i in range(timed_steps):
                step(data, i + 1)
            synchronize(device)
            seconds = (time.perf_counter() - began) / timed_steps
        except torch.cuda.OutOfMemoryError:
            batch //= 2  # the paper's batch spans several GPUs; report what one holds
            continue
        finally:
            step = data = None
            model.zero_grad(set_to_none=True)  # an out-of-memory step may leave gradients behind
            if cuda:
                torch.cuda.empty_cache()
        record(key, {"images_per_second": round(batch / seconds, 2), "seconds_per_step": round(seconds, 4),
                     "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None,
                     "batch": batch, "paper_batch": paper_batch})
        return batch / seconds
    record(key, {"error": "out of memory even at batch 1"})
    return None


def sample_rates(record, preset, model, steps_list, batch, device) -> None:
    """Images/s of the sample stage's own path (seeded ancestral DDPM over the respaced chain)."""
    from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion

    settings = {"preset": preset, "resolution": model.image_size,
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}
    net = build_sampling_model(settings, model.state_dict(), device)
    # Warm-up at the timed batch: the first call at a new shape builds cuDNN's plans (seconds).
    sample_range(net, sampling_diffusion(settings, 2), seed=0, start=0, stop=batch, batch_size=batch,
                 image_size=model.image_size)
    for steps in steps_list:
        diffusion = sampling_diffusion(settings, steps)
        synchronize(device)
        began = time.perf_counter()
        sample_range(net, diffusion, seed=0, start=0, stop=batch, batch_size=batch, image_size=model.image_size)
        synchronize(device)
        seconds = time.perf_counter() - began
        record(f"sample/{preset}/T{steps}", {"images_per_second": round(batch / seconds, 2), "batch": batch,
                                             "steps": steps, "seconds": round(seconds, 2)})


NUMERICS_MODES = {  # name: (deterministic kernels, TF32 in cuDNN convolutions, TF32 in matmuls)
    "torch_default": (False, True, False),
    "fp32": (False, False, False),
    "pipeline": (True, False, False),  # pipeline.device.use_exact_cuda_numerics
}


def step_cuda_numerics(record: Recorder, dry_run: bool) -> None:
    """What the pipeline's CUDA numerics cost: cifar10's Adam step at batch 128 under the
    pipeline's settings (deterministic kernels, no TF32), plain fp32, and torch's default (TF32
    convolutions); for each, images/s and whether two runs of a few steps from the same weights
    and batches end bit-identical. A dry run: the tiny preset on the CPU, batch 2."""
    import torch

    from pipeline import distributed
    from pipeline.device import use_exact_cuda_numerics

    device = torch.device("cpu" if dry_run else "cuda")
    preset, batch, steps = ("tiny", 2, 2) if dry_run else ("cifar10", 128, 4)
    model, diffusion, initial, draw = seeded_model(preset, device)
    data = draw(batch)

    def run() -> tuple[dict[str, torch.Tensor], float]:
        """Weights after `steps` steps from `initial`, and the seconds per step after the first."""
        model.load_state_dict(initial)
        step = paper_step(model, diffusion, RECIPES["adam"], device, distributed.Processes(), {})
        step(data, 0)
        synchronize(device)
        began = time.perf_counter()
        for i in range(1, steps):
            step(data, i)
        synchronize(device)
        return {k: v.clone() for k, v in model.state_dict().items()}, (time.perf_counter() - began) / (steps - 1)

    for name, (deterministic, conv_tf32, matmul_tf32) in NUMERICS_MODES.items():
        if name == "pipeline":
            use_exact_cuda_numerics()
        else:
            torch.use_deterministic_algorithms(deterministic)
            torch.backends.cudnn.allow_tf32 = conv_tf32
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        (first, seconds), (second, _) = run(), run()
        record(f"cuda_numerics/{preset}/{name}", {
            "batch": batch, "images_per_second": round(batch / seconds, 2),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "conv_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "two_runs_bit_identical": all(torch.equal(first[k], second[k]) for k in first)})


def step_forward_compile(record: Recorder, dry_run: bool) -> None:
    """The sample stage's loop with pipeline.nn.forward_compile against eager: the numbers behind
    forward_compile.min_gflop.cuda. A dry run: the tiny preset on the CPU, batch 2, T' = 2."""
    import torch

    from pipeline.config import load_config
    from pipeline.device import use_exact_cuda_numerics
    from pipeline.nn.forward_compile import compile_forward, flops_per_image
    from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion

    config = load_config([REPO / "config.yaml"])
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run:
        use_exact_cuda_numerics()  # as the sample stage runs: deterministic kernels, fp32 without TF32
    preset, steps, batch = ("tiny", 2, 2) if dry_run else ("cifar10", 20, config["sampling"]["batch_size"])
    torch.manual_seed(0)
    model, _ = paper_model(preset)
    settings = {"preset": preset, "resolution": model.image_size,
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}
    net = build_sampling_model(settings, model.state_dict(), device)
    diffusion = sampling_diffusion(settings, steps)
    flops = flops_per_image(net, (net.in_channels, net.image_size, net.image_size))

    def seconds() -> float:
        synchronize(device)
        began = time.perf_counter()
        sample_range(net, diffusion, seed=0, start=0, stop=batch, batch_size=batch, image_size=net.image_size)
        synchronize(device)
        return time.perf_counter() - began

    seconds()  # warm-up
    eager = min(seconds() for _ in range(2))
    began = time.perf_counter()
    compile_forward(net, batch)
    with torch.no_grad():
        net(torch.zeros(batch, net.in_channels, net.image_size, net.image_size, device=device),
            torch.zeros(batch, dtype=torch.int64, device=device))
    synchronize(device)
    compile_seconds = time.perf_counter() - began
    compiled = min(seconds() for _ in range(2))
    work = batch * steps * flops / 1e9
    saved_per_gflop = (eager - compiled) / work
    record(f"forward_compile/{preset}/T{steps}", {
        "batch": batch, "gflop_per_batch_loop": round(work, 2), "eager_seconds": round(eager, 4),
        "compiled_seconds": round(compiled, 4), "speedup": round(eager / compiled, 3),
        "compile_seconds": round(compile_seconds, 1),
        "break_even_gflop": round(compile_seconds / saved_per_gflop) if saved_per_gflop > 0 else None})


DDP_STEPS, DDP_BATCH = 4, 8


def ddp_worker(rank: int, world_size: int, init_file: str, out: str, backend: str) -> None:
    """One process of the group: its share of each global batch; rank 0 writes weights and losses."""
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _, weights, losses = ddp_trajectory(rank, world_size, "cuda" if backend == "nccl" else "cpu")
        if rank == 0:
            torch.save({"weights": weights, "losses": losses}, out)
    finally:
        dist.destroy_process_group()


def ddp_trajectory(rank: int, world_size: int | None, device_type: str):
    """(initial weights, final weights, losses) of DDP_STEPS SAM steps of the tiny preset from seed 0.

    The train stage's step throughout. world_size None: one process on the whole global batch;
    else this rank's share of it, the step's data parallelism from distributed.Processes (for
    world size 2 and up: DDP, which all-reduces both of SAM's gradients). Losses are the
    step's, averaged over the processes.
    """
    import torch

    from pipeline import distributed

    set_mode("fp32")
    torch.manual_seed(0)
    model, diffusion = paper_model("tiny")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    model = model.to(device)
    procs, share = distributed.Processes(), slice(0, DDP_BATCH)
    if world_size is not None:
        procs = distributed.Processes(rank=rank, world_size=world_size, local_world_size=world_size)
        share = slice(rank * DDP_BATCH // world_size, (rank + 1) * DDP_BATCH // world_size)
    step = paper_step(model, diffusion, RECIPES["sam"], device, procs, cuda={})
    model.train()
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(DDP_STEPS):
        x0 = torch.rand(DDP_BATCH, 3, 16, 16, generator=g) * 2 - 1
        t = torch.randint(0, diffusion.num_timesteps, (DDP_BATCH,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        batch = uniform_batch(x0[share].to(device), t[share].to(device), noise[share].to(device))
        losses.append(step(batch, i)["loss"])
    return initial, {k: v.cpu() for k, v in model.state_dict().items()}, losses


def step_ddp_nccl(record: Recorder, dry_run: bool) -> None:
    """The train stage's step under a process group against one process on the same global batch;
    in a dry run over gloo on the CPU.

    World size 1 checks that a process group of one changes nothing (the step runs without DDP
    there, as training does); world size 2 runs DDP.
    """
    import torch
    import torch.multiprocessing as mp

    device_type, backend = ("cpu", "gloo") if dry_run else ("cuda", "nccl")
    gpus = torch.cuda.device_count()
    start, alone, losses = ddp_trajectory(0, None, device_type)
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2):
            if not dry_run and world_size > gpus:
                record(f"ddp/world{world_size}", {"skipped": f"{gpus} GPU(s)"})
                continue
            out = str(Path(tmp) / f"world{world_size}.pt")
            worker_args = (world_size, str(Path(tmp) / f"init{world_size}"), out, backend)
            if world_size == 1:
                ddp_worker(0, *worker_args)  # a process group of this process alone
            else:
                mp.spawn(ddp_worker, args=worker_args, nprocs=world_size)
            got = torch.load(out, weights_only=True)
            travelled = torch.cat([(alone[k] - start[k]).flatten().float() for k in alone]).norm()
            apart = torch.cat([(alone[k] - got["weights"][k]).flatten().float() for k in alone]).norm()
            record(f"ddp/world{world_size}", {
                "backend": backend, "steps": DDP_STEPS, "global_batch": DDP_BATCH, "recipe": RECIPES["sam"],
                "bit_identical": all(torch.equal(alone[k], got["weights"][k]) for k in alone),
                "weights_apart_over_travelled": float(apart / travelled),
                "loss_one_process": losses, "loss_ddp_rank0": got["losses"],
                # As the gloo test: the same trajectory up to float summation order.
                "same_trajectory": float(apart / travelled) < 1e-2})


def parse_estimate(text: str) -> tuple[dict[str, dict[str, float]], float | None]:
    """Per-rule jobs and device-hours, and the total, from the table `pipeline plan` prints."""
    rules = {}
    for line in text.splitlines():
        match = re.match(r"(\S+)\s+(\d+)\s+([\d.]+)\s+[\d.]+%", line)
        if match:
            rules[match[1]] = {"jobs": int(match[2]), "gpu_hours": float(match[3])}
    total = re.search(r"^total\s+\d+\s+([\d.]+)", text, flags=re.M)
    return rules, None if total is None else float(total[1])


def step_plan_calibrate(record: Recorder, dry_run: bool) -> None:
    """The paper's plan (config.yaml, every job) timed on this GPU and costed per rule.

    Without the Inception weights in the torch-hub cache (machines without internet), the FD
    rules are costed with the offline EffNet-Lite0 extractor instead, and the record says so.
    """
    from pipeline.errors import PipelineError
    from pipeline.fidelity.extractors import resolve_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        configs = ["config.yaml"]
        try:
            resolve_inception_weights(download=False)
            record("extractor", "inception")
        except PipelineError:
            overlay = Path(tmp) / "effnet.yaml"
            overlay.write_text("fid: {extractor: effnet-lite0}\n")
            configs.append(str(overlay))
            record("extractor", "effnet-lite0 (no Inception weights cached here; FD rules costed with it)")
        calibration = Path(tmp) / "calibration.json"
        result = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--configfile", *configs, "--all",
                                 "--calibrate", "--device", "cuda", "--repeats", "1",
                                 "--calibration", str(calibration)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        print(result.stdout, flush=True)  # its progress went to stderr, the log, as it came
        if calibration.exists():
            record("calibration", json.loads(calibration.read_text()))
    rules, total = parse_estimate(result.stdout)
    record("gpu_hours_per_rule", rules)
    if total is not None:
        record("gpu_hours_total", total)
    if result.returncode != 0:
        raise SystemExit(result.returncode)


def step_demo(record: Recorder, dry_run: bool) -> None:
    import torch

    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--resources",
                   f"gpu={torch.cuda.device_count()}", "--configfile", "config/demo.yaml",
                   "--config", "device=cuda", f"results={tmp}/demo"]
        record("command", " ".join(command))
        began = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            print(line, end="", flush=True)
            done = re.search(r"(\d+) of (\d+) steps", line)
            if done:  # how far a run cut at its limit got
                record("progress", {"jobs_done": int(done[1]), "jobs": int(done[2]),
                                    "seconds": round(time.perf_counter() - began, 1)})
        code = proc.wait()
    record("exit_status", code)
    if code == 0:
        record("wall_seconds", round(time.perf_counter() - began, 1))
    else:
        raise SystemExit(code)


WORKERS: dict[str, Callable[[Recorder, bool], None]] = {
    "environment": step_environment, "cuda_tests": step_cuda_tests, "cuda_numerics": step_cuda_numerics,
    "presets": step_presets,
    "forward_compile": step_forward_compile,
    "ddp_nccl": step_ddp_nccl, "plan_calibrate": step_plan_calibrate, "demo": step_demo,
}

if __name__ == "__main__":
    sys.exit(main())
