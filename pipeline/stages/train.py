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
"""

from __future__ import annotations

import argparse
import contextlib
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
from pipeline import distributed, seeding
from pipeline.data.loader import TrainingBatches
from pipeline.diffusion.gaussian import create_diffusion
from pipeline.diffusion.timestep_sampler import LossSecondMomentResampler, UniformSampler
from pipeline.errors import PipelineError
from pipeline.io import provenance, write_attrs
from pipeline.io.atomic import atomic_path, remove_stale_temporaries
from pipeline.io.integrity import save_torch, sealed_h5
from pipeline.io.checkpoint import load_checkpoint, save_checkpoint
from pipeline.io.lock import claim_outputs
from pipeline.layout import WEIGHT_FILES as WEIGHTS
from pipeline.nn.presets import build_unet
from pipeline.optim.averages import EMA, SWA
from pipeline.optim.fsgld import FSGLD
from pipeline.optim.sam import SAM
from pipeline.progress import Progress, duration
from pipeline.recipes import Recipe, base_optimizer_class, check_fsgld_base, recipe_from_description
from pipeline.settings import read_settings

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
    final outputs (the checkpoint is written first): tests use it to interrupt a run.
    """
    procs, device = distributed.start(settings["device"])
    try:
        _train(settings, data_path, Path(out_dir), procs, device, stop_after, progress)
    finally:
        distributed.stop(procs)


def _train(settings, data_path, out_dir, procs, device, stop_after, progress) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_from_description(settings["recipe"])
    seed, total_steps = settings["seed"], settings["steps"]
    use_cuda_opts = device.type == "cuda"
    main = procs.is_main

    # Data, model, diffusion.
    batches = TrainingBatches(data_path, batch_size=settings["batch_size"], seed=seed,
                              random_flip=settings["random_flip"], rank=procs.rank,
                              world_size=procs.world_size)
    torch.manual_seed(seeding.derive_seed(seed, stream="init"))
    model = build_unet(settings["preset"], in_channels=batches.channels,
                       learn_sigma=settings["diffusion"]["learn_sigma"]).to(device)
    if batches.image_size != model.image_size:
        raise PipelineError(f"{data_path} holds {batches.image_size}px images but preset "
                            f"'{settings['preset']}' is built for {model.image_size}px.")
    if use_cuda_opts and settings["cuda"].get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    diffusion = create_diffusion(steps=settings["diffusion"]["steps"],
                                 noise_schedule=settings["diffusion"]["noise_schedule"],
                                 learn_sigma=settings["diffusion"]["learn_sigma"])
    sampler = (LossSecondMomentResampler(diffusion.num_timesteps)
               if settings["schedule_sampler"] == "loss-second-moment"
               else UniformSampler(diffusion.num_timesteps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=use_cuda_opts and bool(settings["cuda"].get("bf16")))

    # Optimizer (the recipe decides the wrapper); the two weight averages live on process 0.
    optimizer = build_optimizer(model, recipe, seed)
    ema = EMA(model, decay=settings["ema"]["decay"]) if main else None
    swa = SWA(model, start_fraction=settings["swa"]["start_fraction"],
              every=settings["swa"]["every"], total_steps=total_steps) if main else None

    # Resume from this run's own checkpoint; one of other settings (say, an edited rho) is stale.
    # Only what shapes the trajectory names it: a new log or checkpoint interval resumes.
    settings_json = json.dumps(settings, sort_keys=True)
    trajectory_json = json.dumps({k: v for k, v in settings.items() if k not in NOT_TRAJECTORY}, sort_keys=True)
    ckpt_path = out_dir / f"checkpoint-{hashlib.sha256(trajectory_json.encode()).hexdigest()[:12]}.pt"
    if main:
        for stale in out_dir.glob("checkpoint-*.pt"):
            if stale != ckpt_path:
                stale.unlink()
        remove_stale_temporaries(out_dir, r"checkpoint-[0-9a-f]+\.pt")  # of killed runs, any settings
    distributed.barrier(procs)
    log = {name: [] for name in LOG_FIELDS}
    interval_times: list[float] = []
    step = 0
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if main:
            ema.load_state_dict(ckpt["ema"])
            swa.load_state_dict(ckpt["swa"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"])
        log = {name: list(values) for name, values in ckpt["log"].items()}
        # Timings of another log interval would mix two interval lengths in train.h5.
        if json.loads(ckpt["settings_json"]).get("log_every") == settings["log_every"]:
            interval_times = list(ckpt["interval_times"])
        step = int(ckpt["step"])
        del ckpt

    # Data parallel: DDP all-reduces (averages) the gradients in every backward pass.
    ddp = None
    if procs.parallel:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = ddp if ddp is not None else model
    if use_cuda_opts and settings["cuda"].get("compile"):
        forward = torch.compile(forward)

    def local_gradient_only():
        """Backward passes that keep this process's gradient (no all-reduce), under DDP."""
        return ddp.no_sync() if ddp is not None else contextlib.nullcontext()

    def checkpoint() -> None:
        if not main:
            return
        save_checkpoint({
            "settings_json": settings_json, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(), "swa": swa.state_dict(), "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(), "log": log, "interval_times": interval_times,
        }, ckpt_path)
        write_status(out_dir / STATUS_FILE, bar, "running")

    def losses(x0, t, weights, noise, input_noise):
        """Importance-weighted batch loss and the per-sample terms, at the current weights."""
        with autocast:
            terms = diffusion.training_losses(forward, x0, t, noise, input_noise=input_noise)
        return (terms["loss"] * weights).mean(), terms

    model.train()
    bar = Progress(logger, f"train {recipe.name}" + (f" x{procs.world_size}" if procs.parallel else ""),
                   total_steps, "steps", initial=step, bar=progress, enabled=main)
    interval_start, steps_this_call = time.perf_counter(), 0
    while step < total_steps:
        x0, t, weights, noise, input_noise = draw_step(batches, sampler, seed, step, recipe.ip_gamma, device)
        torch.manual_seed(seeding.derive_seed(seed, step, procs.rank, stream="dropout"))

        # Gradient at the point the recipe asks for (theta, or theta + eps for fSGLD). SAM's
        # m-sharpness variant ascends along each process's own gradient, so pass 1 skips the
        # all-reduce; by default the ascent uses the global gradient, as in one process.
        if isinstance(optimizer, FSGLD):
            loss, terms, grad_norm = _fsgld_gradient(optimizer, losses, local_gradient_only,
                                                     x0, t, weights, noise, input_noise)
        else:
            per_process = isinstance(optimizer, SAM) and recipe.sam.get("m_sharpness", False)
            with local_gradient_only() if per_process else contextlib.nullcontext():
                loss, terms = losses(x0, t, weights, noise, input_noise)
                loss.backward()
            grad_norm = _grad_norm(model)
        stats = _global_stats(loss, terms, procs)
        _check_finite(stats, step, recipe)
        if isinstance(sampler, LossSecondMomentResampler):  # the only sampler that learns
            sampler.update(distributed.gather_in_rank_order(t, procs),
                           distributed.gather_in_rank_order(terms["loss"].detach(), procs))

        # Update: SAM takes a second gradient at theta + rho g/||g|| on the same x0, t, noise.
        if isinstance(optimizer, SAM):
            optimizer.first_step()
            optimizer.zero_grad(set_to_none=True)
            losses(x0, t, weights, noise, input_noise)[0].backward()
            optimizer.second_step()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Averages see only the stepped weights (never SAM's or fSGLD's perturbed point).
        if main:
            ema.update(model)
            swa.update(model, step)

        for name in ("loss", "mse", "vb"):
            log[name].append(stats[name])
        log["grad_norm"].append(grad_norm)
        log["lr"].append(optimizer.param_groups[0]["lr"])
        window = log["loss"][-settings["log_every"]:]
        bar.update(1, loss=sum(window) / len(window))
        steps_this_call += 1
        if step % settings["log_every"] == 0 or step == total_steps:
            now = time.perf_counter()
            interval_times.append(now - interval_start)
            interval_start = now
            distributed.check_replicas_agree(list(model.parameters()), procs, step)
        if step % settings["checkpoint_every"] == 0 or step == total_steps:
            checkpoint()
        if stop_after is not None and steps_this_call >= stop_after and step < total_steps:
            checkpoint()
            bar.close()
            if main:
                logger.info("train %s: stopped after %d steps of this call (--stop-after) at step %d/%d; "
                            "checkpoint %s", recipe.name, steps_this_call, step, total_steps, ckpt_path)
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


def draw_step(batches: TrainingBatches, sampler, seed: int, step: int, ip_gamma: float,
              device: torch.device):
    """This process's share of the batch and of every draw of one step, functions of (seed, step).

    Returns x0 (B, C, H, W) in [-1, 1], timesteps t (B,), importance weights (B,), the target
    noise eps, and the noise that builds x_t: eps + gamma * xi for input perturbation (DDPM-IP),
    else None (x_t from eps itself); B is the process's share of the global batch. Each draw is
    made for the global batch and sliced, so sample j gets the same numbers however many
    processes share the batch.
    """
    share = slice(batches.rank * batches.local_batch_size, (batches.rank + 1) * batches.local_batch_size)
    x0 = batches.batch(step).to(device, non_blocking=True)
    t, weights = sampler.sample(batches.batch_size, seeding.generator(seed, step, stream="timesteps"), device)
    t, weights = t[share], weights[share]
    noise = _randn_share(x0, batches.batch_size, share, seeding.generator(seed, step, stream="noise"))
    input_noise = None
    if ip_gamma:
        xi = _randn_share(x0, batches.batch_size, share,
                          seeding.generator(seed, step, stream="input_perturbation"))
        input_noise = noise + ip_gamma * xi
    return x0, t, weights, noise, input_noise


def build_optimizer(model: torch.nn.Module, recipe: Recipe, seed: int) -> torch.optim.Optimizer:
    """The recipe's optimizer: the base alone, SAM around it, or fSGLD on it."""
    base_cls, base_kwargs = base_optimizer_class(recipe)
    params = list(model.parameters())
    if recipe.sam is not None:
        return SAM(params, base_cls, rho=recipe.sam["rho"], adaptive=recipe.sam["adaptive"],
                   asam_eta=recipe.sam["asam_eta"], **base_kwargs)
    if recipe.fsgld is not None:
        f = recipe.fsgld
        check_fsgld_base(recipe)
        base = "sgd" if recipe.optimizer["name"] == "sgd" else "adam"
        extra = {} if base == "sgd" else {"betas": base_kwargs["betas"]}
        return FSGLD(params, lr=base_kwargs["lr"], seed=seeding.derive_seed(seed, stream="fsgld"),
                     beta_inv=f["beta_inv"], eta=f["eta"], sigma=f["sigma"], n_pert=f["n_pert"],
                     antithetic=f["antithetic"], base=base, weight_decay=base_kwargs["weight_decay"],
                     **extra)
    return base_cls(params, **base_kwargs)


def _fsgld_gradient(optimizer, losses, local_gradient_only, x0, t, weights, noise, input_noise):
    """Accumulate the gradient over n_pert weight perturbations theta + eps (fSGLD).

    Every process draws the same eps (the optimizer's generator is seeded alike), and only the
    last backward pass all-reduces: the sum of the draws' gradients is reduced once.
    """
    for draw in range(optimizer.n_pert):
        optimizer.perturb()
        last = draw == optimizer.n_pert - 1
        with contextlib.nullcontext() if last else local_gradient_only():
            loss, terms = losses(x0, t, weights, noise, input_noise)
            loss.backward()
        optimizer.restore()
    return loss, terms, _grad_norm(optimizer.param_groups[0]["params"], scale=1.0 / optimizer.n_pert)


def _grad_norm(params_or_model, scale: float = 1.0) -> float:
    params = params_or_model.parameters() if isinstance(params_or_model, torch.nn.Module) else params_or_model
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) * scale


def _global_stats(loss: torch.Tensor, terms: Mapping[str, torch.Tensor],
                  procs: distributed.Processes) -> dict[str, float]:
    """Batch means of the loss terms over all processes, and whether any term was non-finite.

    One small all-reduce, so every process sees the same numbers and stops together.
    """
    vb = terms["vb"] if "vb" in terms else torch.zeros_like(terms["mse"])
    local = torch.stack([loss.detach(), terms["mse"].detach().mean(), vb.detach().mean(),
                         (~torch.isfinite(terms["mse"])).any().float(),
                         (~torch.isfinite(vb)).any().float()]).double()
    total = distributed.sum_over_processes(local, procs).tolist()
    n = procs.world_size
    return {"loss": total[0] / n, "mse": total[1] / n, "vb": total[2] / n,
            "nonfinite_mse": total[3] > 0, "nonfinite_vb": total[4] > 0}


def _check_finite(stats: Mapping[str, Any], step: int, recipe: Recipe) -> None:
    bad = [name for name in ("mse", "vb") if stats[f"nonfinite_{name}"]]
    if bad:
        raise PipelineError(f"non-finite training loss at step {step + 1} of recipe '{recipe.name}' "
                            f"(term: {', '.join(bad)}); the last good checkpoint is kept. Lower the "
                            f"learning rate or the recipe's perturbation strength and rerun.")


def _randn_share(x: torch.Tensor, global_batch: int, share: slice, generator: torch.Generator) -> torch.Tensor:
    """This process's rows of Gaussian noise drawn for the whole global batch, shaped like x.

    Drawn on the CPU generator, so CPU and CUDA runs see the same numbers.
    """
    noise = torch.randn((global_batch, *x.shape[1:]), generator=generator, dtype=torch.float32)
    return noise[share].to(x.device, non_blocking=True)


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
    train(settings, data, out_dir, stop_after=args.stop_after, progress=not args.no_progress)


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
