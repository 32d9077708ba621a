"""Train one ADM model with a recipe; writes raw, EMA and SWA weights and train.h5.

One run yields three weights files (raw, EMA, SWA), so the paper's nine algorithms per dataset
cost three runs. A checkpoint is written every `training.checkpoint_every` steps; rerunning the
same command resumes from it and ends bit-identical (on CPU) to an uninterrupted run, because
every random draw is derived from (seed, step) and the remaining state is in the checkpoint.

With `--processes N` (or under torchrun) the run is N data-parallel processes. The config's batch
is the global batch; each process holds a consecutive share of it, and every per-sample draw
(image, flip, timestep, noise) is taken for the whole global batch and then sliced, so N
processes follow the single-process trajectory up to float summation order, and a checkpoint
resumes with any number of processes. Process 0 keeps the averages and writes every file.

SIGTERM (SLURM's warning before the time limit, or `kill`) and SIGINT (Ctrl-C) end the run at the
next step boundary: the checkpoint is written, one line goes to stderr and the exit status is 75
(pipeline.training.signals.EXIT_STOPPED); rerunning resumes as after any other stop.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.arguments import add_config_arguments, nonnegative_int, path_name, positive_int
from pipeline import distributed
from pipeline.data.loader import TrainingBatches
from pipeline.errors import PipelineError
from pipeline.io import provenance, write_attrs
from pipeline.io.atomic import atomic_path, remove_stale_temporaries
from pipeline.io.integrity import save_torch, sealed_h5
from pipeline.io.checkpoint import load_checkpoint, save_checkpoint
from pipeline.io.lock import claim_outputs
from pipeline.layout import WEIGHT_FILES as WEIGHTS
from pipeline.optim.averages import SWA
from pipeline.progress import Progress, duration
from pipeline.recipes import recipe_from_description
from pipeline.settings import read_settings
from pipeline.training.draws import draw_step
from pipeline.training.optimizer import build_optimizer
from pipeline.training.setup import build_averages, build_diffusion, build_model
from pipeline.training.signals import EXIT_STOPPED, StopSignals, TrainingStopped
from pipeline.training.step import TrainingStep

LOG_FIELDS = ("loss", "mse", "vb", "grad_norm", "lr")
# Refreshed at every checkpoint for `cat` on a cluster; not an output, so not in the Snakemake rule.
STATUS_FILE = "status.json"

logger = logging.getLogger(__name__)
# Settings that change what is logged or when it is saved, never the weights.
NOT_TRAJECTORY = ("log_every", "checkpoint_every")


# ------------------------------------------------------------------------------------------
# The training loop.

def train(settings: Mapping[str, Any], data_path: str | Path, out_dir: str | Path,
          stop_after: int | None = None, progress: bool = True) -> None:
    """Train (or resume) the run described by `settings`, writing into `out_dir`.

    `stop_after` ends the process after that many steps of this invocation without writing the
    final outputs (the checkpoint is written first): tests use it to interrupt a run. SIGTERM or
    SIGINT does the same at the next step boundary and raises TrainingStopped.
    """
    procs, device = distributed.start(settings["device"])
    try:
        with StopSignals() as signals:
            _train(settings, data_path, Path(out_dir), procs, device, stop_after, progress, signals)
    finally:
        distributed.stop(procs)


def _train(settings, data_path, out_dir, procs, device, stop_after, progress, signals) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_from_description(settings["recipe"])
    seed, total_steps, main = settings["seed"], settings["steps"], procs.is_main

    # Data, model, diffusion.
    batches = TrainingBatches(data_path, batch_size=settings["batch_size"], seed=seed,
                              random_flip=settings["random_flip"], rank=procs.rank,
                              world_size=procs.world_size)
    model = build_model(settings, batches.channels, device)
    if batches.image_size != model.image_size:
        raise PipelineError(f"{data_path} holds {batches.image_size}px images but preset "
                            f"'{settings['preset']}' is built for {model.image_size}px.")
    diffusion, sampler = build_diffusion(settings)

    # Optimizer (the recipe decides the wrapper); the two weight averages live on process 0.
    optimizer = build_optimizer(model, recipe, seed)
    ema, swa = build_averages(model, settings) if main else (None, None)

    # Resume from this run's own checkpoint.
    ckpt_path = _checkpoint_path(out_dir, settings, procs)
    step, log, interval_times = _resume(ckpt_path, settings, model, optimizer, ema, swa, sampler)
    train_step = TrainingStep(model, optimizer, diffusion, sampler, recipe.name, seed=seed, device=device,
                              procs=procs, cuda=settings["cuda"], ema=ema, swa=swa)

    def checkpoint() -> None:
        if not main:
            return
        save_checkpoint({
            "settings_json": json.dumps(settings, sort_keys=True), "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(), "swa": swa.state_dict(), "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(), "log": log, "interval_times": interval_times,
        }, ckpt_path)
        write_status(out_dir / STATUS_FILE, bar, "running")

    # Steps: each a function of (seed, step) and the checkpointed state.
    model.train()
    bar = Progress(logger, f"train {recipe.name}" + (f" x{procs.world_size}" if procs.parallel else ""),
                   total_steps, "steps", initial=step, bar=progress, enabled=main)
    interval_start, steps_this_call = time.perf_counter(), 0
    while step < total_steps:
        batch = draw_step(batches, sampler, seed, step, recipe.ip_gamma, device)
        stats = train_step(batch, step, stop_requested=signals.received is not None)
        step += 1
        steps_this_call += 1

        # Log, and checkpoint on schedule, when told to stop (--stop-after) or asked to (a signal).
        for name in LOG_FIELDS:
            log[name].append(stats[name])
        window = log["loss"][-settings["log_every"]:]
        bar.update(1, loss=sum(window) / len(window))
        if step % settings["log_every"] == 0 or step == total_steps:
            now = time.perf_counter()
            interval_times.append(now - interval_start)
            interval_start = now
            distributed.check_replicas_agree(list(model.parameters()), procs, step)
        if step % settings["checkpoint_every"] == 0 or step == total_steps:
            checkpoint()
        if step < total_steps and (stats["stop"] or (stop_after is not None and steps_this_call >= stop_after)):
            checkpoint()
            bar.close()
            why = (f"by {signals.received or 'a signal to another process'}" if stats["stop"]
                   else f"after {steps_this_call} steps of this call (--stop-after)")
            message = (f"train {recipe.name}: stopped {why} at step {step}/{total_steps}; checkpoint "
                       f"{ckpt_path}; rerun the same command to resume")
            if stats["stop"]:
                raise TrainingStopped(message if main else None)
            if main:
                logger.info("%s", message)
            return
    bar.close()
    if not main:
        return

    # Outputs: three plain state_dicts with guided-diffusion key names, and the log.
    save_torch(_cpu_state(model.state_dict()), out_dir / WEIGHTS["none"])
    save_torch(_cpu_state(ema.averaged_state_dict()), out_dir / WEIGHTS["ema"])
    save_torch(_cpu_state(swa.averaged_state_dict()), out_dir / WEIGHTS["swa"])
    write_train_log(out_dir / "train.h5", settings, log, interval_times, swa, procs.world_size)
    ckpt_path.unlink()  # the run is complete; its checkpoint is several times the model's size
    write_status(out_dir / STATUS_FILE, bar, "finished")
    logger.info("train %s: %d steps done (%d in this call, %s), final loss %.4g (mean of the last %d "
                "steps); wrote %s, %s, %s and train.h5 in %s", recipe.name, total_steps, steps_this_call,
                f"{bar.rate():.3g} steps/s", bar.fields.get("loss", math.nan),
                min(settings["log_every"], total_steps), *WEIGHTS.values(), out_dir)


def _checkpoint_path(out_dir: Path, settings: Mapping[str, Any], procs: distributed.Processes) -> Path:
    """This run's checkpoint, named by the settings that shape the trajectory; others are removed.

    A checkpoint of other settings (say, an edited rho) is stale. A new log or checkpoint interval
    resumes, as those are left out of the name.
    """
    trajectory_json = json.dumps({k: v for k, v in settings.items() if k not in NOT_TRAJECTORY}, sort_keys=True)
    ckpt_path = out_dir / f"checkpoint-{hashlib.sha256(trajectory_json.encode()).hexdigest()[:12]}.pt"
    if procs.is_main:
        for stale in out_dir.glob("checkpoint-*.pt"):
            if stale != ckpt_path:
                stale.unlink()
        remove_stale_temporaries(out_dir, r"checkpoint-[0-9a-f]+\.pt")  # of killed runs, any settings
    distributed.barrier(procs)
    return ckpt_path


def _resume(ckpt_path: Path, settings: Mapping[str, Any], model, optimizer, ema, swa, sampler):
    """Load the checkpoint (if any) into the run's state; returns (step, log, interval_times)."""
    log = {name: [] for name in LOG_FIELDS}
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is None:
        return 0, log, []
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
        swa.load_state_dict(ckpt["swa"])
    sampler.load_state_dict(ckpt["sampler"])
    torch.set_rng_state(ckpt["torch_rng"])
    log = {name: list(values) for name, values in ckpt["log"].items()}
    # Timings of another log interval would mix two interval lengths in train.h5.
    same_interval = json.loads(ckpt["settings_json"]).get("log_every") == settings["log_every"]
    return int(ckpt["step"]), log, list(ckpt["interval_times"]) if same_interval else []


def write_status(path: Path, bar: Progress, state: str) -> None:
    """status.json: how far the run is (state running or finished), for a look while it trains.

    Wall-clock numbers only, outside every output, so the weights and train.h5 do not depend on it.
    """
    eta = bar.eta()
    status = {
        "state": state, "step": bar.done, "total": bar.total, "loss": bar.fields.get("loss"),
        "steps_per_second": round(bar.rate(), 4),
        "eta_seconds": round(eta, 1) if math.isfinite(eta) else None, "eta": duration(eta),
        "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(status, indent=1) + "\n")


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def write_train_log(path: Path, settings: Mapping[str, Any], log: Mapping[str, list],
                    interval_times: list[float], swa: SWA, processes: int) -> None:
    """train.h5: per-step loss terms, gradient norm and lr; seconds per log interval; provenance.

    `processes`: the data-parallel processes of the invocation that finished the run.
    """
    with sealed_h5(path) as f:
        for name in LOG_FIELDS:
            f.create_dataset(name, data=np.asarray(log[name], dtype=np.float64))
        f.create_dataset("interval_seconds", data=np.asarray(interval_times, dtype=np.float64))
        f["interval_seconds"].attrs["log_every"] = settings["log_every"]
        write_attrs(f, provenance("train", settings, recipe_label=settings["recipe"]["label"],
                                  swa_snapshots=swa.n_averaged, processes=processes))


# ------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=path_name, required=True,
                        help="dataset name (a key of config 'datasets')")
    parser.add_argument("--recipe", type=path_name, required=True, help="recipe name (a key of config 'recipes')")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="training seed")
    add_config_arguments(parser, "the run's resolved settings (pipeline.settings.TrainSettings)")
    parser.add_argument("--data", default=None, help="data.h5 (default: {results}/{dataset}/data.h5)")
    parser.add_argument("--out-dir", default=None,
                        help="run folder (default: {results}/{dataset}/{recipe}/seed{seed})")
    parser.add_argument("--steps", type=positive_int, default=None, help="override training.steps")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="data-parallel processes, one per GPU (default 1); N > 1 relaunches "
                             "this command under torchrun on this node (gloo on a CPU-only machine)")
    parser.add_argument("--stop-after", type=positive_int, default=None, metavar="K",
                        help="checkpoint and exit after K >= 1 steps of this invocation; rerun to go on "
                             "(fits a long run into scheduler time limits)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


def run(args: argparse.Namespace) -> None:
    if args.processes < 1:
        raise PipelineError(f"--processes must be at least 1, got {args.processes}.")
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(args.processes)
    settings, config = read_settings(args, "train", dataset=args.dataset, recipe=args.recipe, seed=args.seed)
    results = Path((config or {}).get("results", "results"))
    if args.steps is not None:
        settings["steps"] = args.steps
    data = Path(args.data or results / args.dataset / "data.h5")
    if not data.is_file():
        raise PipelineError(f"{data} does not exist; run `python -m pipeline prepare --dataset "
                            f"{args.dataset}` first.")
    out_dir = Path(args.out_dir or results / args.dataset / args.recipe / f"seed{args.seed}")
    if "WORLD_SIZE" not in os.environ:  # torchrun's processes: the launcher holds the claim
        claim_outputs(folders=[out_dir])  # writable and locked before any compute (pipeline.io.lock)
    try:
        train(settings, data, out_dir, stop_after=args.stop_after, progress=not args.no_progress)
    except TrainingStopped as stopped:
        if stopped.args[0]:  # process 0 speaks for all
            print(stopped.args[0], file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STOPPED) from None


def _relaunch_under_torchrun(processes: int) -> None:
    """Replace this process by torchrun running the same command as `processes` processes.

    The threads this command was given (OMP_NUM_THREADS) are shared among the processes.
    """
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # drop --processes N / --processes=N
        if arg == "--processes":
            del argv[i:i + 2]
            break
        if arg.startswith("--processes="):
            del argv[i]
            break
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "pipeline", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
