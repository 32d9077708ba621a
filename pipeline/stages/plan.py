"""Estimate a plan's device-hours per rule before submitting it (`--calibrate` times this device).

Lists the jobs `snakemake --dry-run` plans for the given config files (only the stale ones; every
job with --all), turns each into counts of work units (training steps, image forwards, feature
extractions, ...; see pipeline/cost/model.py) and multiplies them by the seconds per unit that
`--calibrate` measured on this machine, plus a measured per-job start-up. Prints device-hours per
rule and in total, each rule's longest job against its `runtime` resource and the measured peak
memory of its work against `mem_mb`.

  python -m pipeline plan --configfile config/demo.yaml --calibrate   # time this device
  python -m pipeline plan --configfile config/demo.yaml               # the estimate

Calibration runs each work unit in a fresh process (so its peak memory is its own) at the plan's
presets and batch sizes, batches above --max-batch timed at --max-batch and scaled linearly; the
medians of --repeats timings, the device, torch version, threads and load average go to a JSON
file. Timings on a shared machine are noisy: the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.arguments import add_config_arguments
from pipeline.config import REPO_ROOT, load_config, section
from pipeline.cost.dryrun import Job, planned_jobs
from pipeline.cost.model import (RuleCost, Timings, estimate, model_key, recipe_kind, required_units,
                                 total_seconds)
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.launch import wire
from pipeline.settings import config_files

# The stage whose `--help` start-up is timed as every job's overhead (imports torch and the UNet).
STARTUP_PROBE = ["-m", "pipeline.launch", "sample", "--help"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, None)
    parser.add_argument("--all", dest="everything", action="store_true",
                        help="every job of the plan, not only the stale ones (snakemake --forceall)")
    parser.add_argument("--calibrate", action="store_true",
                        help="time every work unit of the whole plan on this device first and store it")
    parser.add_argument("--calibration", default=None,
                        help="calibration JSON (default {results}/cost/calibration-<device>.json)")
    parser.add_argument("--device", default="cpu", help="device to calibrate on: cpu | cuda | cuda:K")
    parser.add_argument("--max-batch", dest="max_batch", type=int, default=64,
                        help="largest batch timed; larger ones are timed at this size and scaled")
    parser.add_argument("--repeats", type=int, default=3, help="timings per unit (the median is kept)")
    parser.add_argument("--workdir", default=str(REPO_ROOT), help="the folder holding the Snakefile")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one unit, JSON out


def device_label(device: str) -> str:
    """The device's part of the calibration file name: cpu or cuda-<gpu model>."""
    if device == "cpu":
        return "cpu"
    import torch
    name = torch.cuda.get_device_name(torch.device(device))
    return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def default_calibration_path(config: Mapping[str, Any], device: str) -> Path:
    return Path(config["results"]) / "cost" / f"calibration-{device_label(device)}.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Work-unit specifications: what to build to time a key of pipeline.cost.model.

def unit_spec(key: str, config: Mapping[str, Any], device: str, max_batch: int, repeats: int) -> dict[str, Any]:
    """Everything a fresh process needs to time one work unit, from its key and the config."""
    kind, _, rest = key.partition("/")
    spec: dict[str, Any] = {"key": key, "kind": kind, "device": device, "repeats": repeats,
                            "diffusion": dict(section(config, "training", "diffusion"))}
    if kind in ("train", "sample", "loss", "hvp"):
        dataset = _dataset_of(config, "/".join(rest.split("/")[:3]))
        data = section(config, "datasets", dataset)
        batch = int(rest.split("/")[3].removeprefix("b"))
        spec.update(dataset=dataset, preset=data["preset"], resolution=int(data["resolution"]),
                    channels=int(rest.split("/")[2].removeprefix("c")), batch=batch,
                    measured_batch=min(batch, max_batch))
        if kind == "train":
            recipe_kind_name = rest.split("/")[4]
            from pipeline.settings import study_recipes, train_settings
            recipe = next(r for r in study_recipes(section(config, "study"))
                          if recipe_kind(config, r) == recipe_kind_name)
            spec["train_settings"] = train_settings(config, dataset, recipe, 0)
    elif kind == "extract":
        extractor, resolution, channels = rest.split("/")
        spec.update(extractor=extractor, resolution=int(resolution.removesuffix("px")),
                    channels=int(channels.removeprefix("c")),
                    batch=int(section(config, "fid", "batch_size")),
                    measured_batch=min(int(section(config, "fid", "batch_size")), max_batch),
                    inception_weights=config["fid"].get("inception_weights"))
    elif kind == "fid_fixed":
        extractor, n = rest.split("/")
        fid = section(config, "fid")
        bootstrap = fid.get("bootstrap") or {}
        reference = fid["reference_images"]
        spec.update(extractor=extractor, n=int(n.removeprefix("n")), kid_rows=int(fid["kid_rows"]),
                    reference_rows=int(fid["kid_rows"]) if reference is None else min(int(reference), int(fid["kid_rows"])),
                    fd_replicates=int(bootstrap.get("fd_replicates", 0)),
                    kid_replicates=int(bootstrap.get("kid_replicates", 0)),
                    kid_subsets=int(fid.get("kid_subsets", 0)), kid_subset_size=int(fid.get("kid_subset_size", 1000)),
                    inception_weights=fid.get("inception_weights"))
    elif kind == "kid_reference":
        extractor, rows, replicates = rest.split("/")
        spec.update(extractor=extractor, rows=int(rows.removeprefix("r")),
                    replicates=int(replicates.removeprefix("b")),
                    inception_weights=section(config, "fid").get("inception_weights"))
    else:
        raise PipelineError(f"no calibration for work unit '{key}'.")
    return spec


def _dataset_of(config: Mapping[str, Any], model: str) -> str:
    for dataset in section(config, "study", "datasets"):
        if model_key(config, dataset) == model:
            return dataset
    raise PipelineError(f"no dataset of study.datasets uses model {model}.")


# ---------------------------------------------------------------------------------------------
# Timing one unit (runs in its own process: `python -m pipeline plan --measure SPEC`).

def _clock():
    """The clock calibration reads: on the CPU, this process's CPU seconds per thread, which other
    processes sharing the cores do not inflate (wall time would, by the load average); on a GPU,
    wall time after a synchronize."""
    import torch
    if _CLOCK["cuda"]:
        return time.perf_counter()
    return time.process_time() / torch.get_num_threads()


_CLOCK = {"cuda": False}


def _median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up: allocator, oneDNN kernels, lazy inits
    sync()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        sync()
        times.append(_clock() - start)
    return statistics.median(times)


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds per unit (and what was timed) for one work unit, in this process."""
    import torch

    from pipeline.device import resolve_device
    device = resolve_device(spec["device"])
    cuda = device.type == "cuda"
    _CLOCK["cuda"] = cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kind, repeats = spec["kind"], int(spec["repeats"])
    if kind in ("train", "sample", "loss", "hvp"):
        seconds = _measure_model_unit(spec, device, sync)
    elif kind == "extract":
        seconds = _measure_extract(spec, cuda, sync)
    elif kind == "kid_reference":
        seconds = _measure_kid_reference(spec)
    else:
        seconds = _measure_fid_fixed(spec, cuda)
    import resource
    result = {"seconds": seconds, "repeats": repeats,
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for name in ("batch", "measured_batch"):
        if name in spec:
            result[name] = spec[name]
    return result


def _measure_model_unit(spec, device, sync) -> float:
    import torch

    from pipeline.diffusion.gaussian import create_diffusion
    from pipeline.flatness.evalset import effective_terms, per_sample_loss
    from pipeline.flatness.hessian import HessianOperator, twice_differentiable
    from pipeline.flatness.weights import randn_like_params, trainable_parameters
    from pipeline.nn.channels_last_norm import channels_last_inference
    from pipeline.nn.presets import build_unet
    from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion

    d = spec["diffusion"]
    b, repeats = int(spec["measured_batch"]), int(spec["repeats"])
    if spec["kind"] == "train":
        return _measure_train_step(spec, device, sync) * spec["batch"] / b
    torch.manual_seed(0)
    model = build_unet(spec["preset"], in_channels=spec["channels"], learn_sigma=bool(d["learn_sigma"]))
    shape = (b, spec["channels"], spec["resolution"], spec["resolution"])
    if spec["kind"] == "sample":
        steps = 2  # a reverse step costs the same at any T'; the unit is one image-step
        sampler_settings = {"preset": spec["preset"], "resolution": spec["resolution"], "diffusion": d}
        net = build_sampling_model(sampler_settings, model.state_dict(), device)
        diffusion = sampling_diffusion(sampler_settings, steps)
        run = lambda: sample_range(net, diffusion, 0, 0, b, b, spec["resolution"])  # noqa: E731
        return _median_time(run, repeats, sync) / (b * steps)
    diffusion = create_diffusion(steps=int(d["steps"]), noise_schedule=d["noise_schedule"],
                                 learn_sigma=bool(d["learn_sigma"]))
    model = model.to(device).eval()
    terms = effective_terms(diffusion, "mse+vb")
    generator = torch.Generator().manual_seed(0)
    x0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    if spec["kind"] == "loss":
        if device.type == "cpu":  # as the loss-based measures run it (pipeline.stages.metric_common)
            model = channels_last_inference(model)

        def run():
            with torch.no_grad():
                per_sample_loss(model, diffusion, x0, t, noise, terms).sum().item()
        return _median_time(run, repeats, sync) / b
    params = trainable_parameters(model)
    with twice_differentiable(model):
        hvp = HessianOperator(params, lambda: per_sample_loss(model, diffusion, x0, t, noise, terms).mean())
        vector = randn_like_params(params, torch.Generator(device=device).manual_seed(0))
        return _median_time(lambda: hvp(vector), repeats, sync) / b


def _measure_train_step(spec, device, sync) -> float:
    """One step of the train stage (pipeline.training.step) at the measured batch, on random images."""
    import itertools

    from pipeline import distributed
    from pipeline.recipes import recipe_from_description
    from pipeline.training.draws import RandomImages, draw_step
    from pipeline.training.optimizer import build_optimizer
    from pipeline.training.setup import build_averages, build_diffusion, build_model
    from pipeline.training.step import TrainingStep

    settings = dict(spec["train_settings"], batch_size=int(spec["measured_batch"]))
    recipe = recipe_from_description(settings["recipe"])
    batches = RandomImages(settings["batch_size"], spec["channels"], spec["resolution"])
    model = build_model(settings, spec["channels"], device)
    diffusion, sampler = build_diffusion(settings)
    optimizer = build_optimizer(model, recipe, settings["seed"])
    ema, swa = build_averages(model, settings)
    train_step = TrainingStep(model, optimizer, diffusion, sampler, recipe.name, seed=settings["seed"],
                              device=device, procs=distributed.Processes(), cuda=settings["cuda"],
                              ema=ema, swa=swa)
    model.train()
    steps = itertools.count()

    def step():
        i = next(steps)
        train_step(draw_step(batches, sampler, settings["seed"], i, recipe.ip_gamma, device), i)

    return _median_time(step, int(spec["repeats"]), sync)


def _measure_extract(spec, cuda, sync) -> float:
    import numpy as np

    from pipeline.fidelity.extractors import resolve_extractor
    from pipeline.fidelity.stats import feature_statistics

    extractor = resolve_extractor(spec["extractor"], spec.get("inception_weights"))
    b = int(spec["measured_batch"])
    images = np.random.default_rng(0).integers(0, 256, (8 * b, spec["resolution"], spec["resolution"],
                                                         spec["channels"]), dtype=np.uint8)
    # Two sizes, 2 and 8 batches: their difference removes the extractor's construction (charged to
    # fid_fixed). At 1 and 2 batches the difference drowned in the noise (0 s per image measured for
    # 0.9 ms), so the plan left extraction out of every FD job.
    feature_statistics(images[:b], extractor, batch_size=b, cuda=cuda)  # warm-up
    small = _median_time(lambda: feature_statistics(images[:2 * b], extractor, batch_size=b, cuda=cuda),
                         int(spec["repeats"]), sync)
    large = _median_time(lambda: feature_statistics(images, extractor, batch_size=b, cuda=cuda),
                         int(spec["repeats"]), sync)
    return max(large - small, 0.0) / (6 * b)


def _measure_fid_fixed(spec, cuda) -> float:
    """Extractor construction plus the FD, KID and bootstrap arithmetic of one FD job."""
    import numpy as np

    from pipeline.fidelity.bootstrap import fd_replicates, kid_replicates, psd_sqrt, reference_within_terms
    from pipeline.fidelity.extractors import resolve_extractor
    from pipeline.fidelity.stats import frechet_distance, kernel_distance

    extractor = resolve_extractor(spec["extractor"], spec.get("inception_weights"))
    start = _clock()
    net = extractor.build(cuda)
    build = _clock() - start
    dim = _feature_dim(extractor)
    del net
    rng = np.random.default_rng(0)
    n = int(spec["n"])
    features = rng.standard_normal((n, dim)).astype(np.float32)
    reference = rng.standard_normal((int(spec["reference_rows"]), dim)).astype(np.float32)
    ref_mu, ref_sigma = reference.mean(0).astype(np.float64), np.cov(reference, rowvar=False)
    ref_sqrt = psd_sqrt(ref_sigma)  # computed once per reference file, not per job; timed here anyway
    kid_features = features[: int(spec["kid_rows"])]
    # Read from the kid_reference job's file, not computed (that job is costed on its own).
    reference_within = reference_within_terms(reference, int(spec["kid_replicates"]), 0)

    def arithmetic():
        mu, sigma = features.mean(0).astype(np.float64), np.cov(features, rowvar=False)
        frechet_distance(mu, sigma, ref_mu, ref_sigma)
        if spec["kid_subsets"]:
            kernel_distance(kid_features, reference, subsets=int(spec["kid_subsets"]),
                            subset_size=int(spec["kid_subset_size"]), seed=0)
        if spec["fd_replicates"]:
            fd_replicates(features, ref_mu, ref_sigma, ref_sqrt, int(spec["fd_replicates"]), 0)
        kid_replicates(kid_features, reference, int(spec["kid_replicates"]), 0, reference_within=reference_within)

    start = _clock()
    arithmetic()
    return build + _clock() - start


def _feature_dim(extractor) -> int:
    return int(extractor.feature_layer) if extractor.feature_layer.isdigit() else 2048


def _measure_kid_reference(spec) -> float:
    """The reference's KID bootstrap terms (kid-reference) for random features of the extractor's size."""
    import numpy as np

    from pipeline.fidelity.bootstrap import reference_within_terms
    from pipeline.fidelity.extractors import resolve_extractor

    dim = _feature_dim(resolve_extractor(spec["extractor"], spec.get("inception_weights")))
    reference = np.random.default_rng(0).standard_normal((int(spec["rows"]), dim)).astype(np.float32)
    start = _clock()
    reference_within_terms(reference, int(spec["replicates"]), 0)
    return _clock() - start


# ---------------------------------------------------------------------------------------------
# Calibration driver and the estimate.

def _measure_command(spec: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return [sys.executable, "-m", "pipeline", "plan", "--measure", json.dumps(spec)], env


def _run_measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    command, env = _measure_command(spec)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    return _measured(spec, done.returncode, done.stdout, done.stderr)


def _measured(spec: Mapping[str, Any], returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    if returncode < 0:
        # SIGKILL with no traceback is the kernel's out-of-memory killer, most of the time.
        raise PipelineError(f"calibrating {spec['key']} was killed by signal {-returncode} (out of "
                            f"memory?); lower --max-batch or calibrate on a larger machine.")
    if returncode != 0:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"calibrating {spec['key']} failed: {tail}")
    return json.loads(stdout.strip().splitlines()[-1])


def measure_startup(repeats: int) -> dict[str, float]:
    """Median start-up of a stage job that imports torch and the UNet and exits, as a local run pays
    it (forked by the fork server, pipeline/launch) and as a cluster job pays it (its own process):
    CPU seconds (user + system, the client's and the forked child's; what an idle core would take)
    and wall seconds (inflated by load). The server's own imports are paid once per run, not per job."""
    own = _startup_runs(repeats, {wire.SOCKET_VARIABLE: wire.OFF})
    folder = tempfile.mkdtemp(prefix="plan-", dir="/tmp")  # a Unix socket path holds 107 bytes at most
    path = os.path.join(folder, "s.sock")
    server = subprocess.Popen([sys.executable, "-m", "pipeline.launch.server", "--socket", path],
                              stdin=subprocess.DEVNULL)
    try:
        while not os.path.exists(path):
            if server.poll() is not None:
                raise PipelineError("the fork server did not start; run `python -m pipeline.launch.server "
                                    "--socket /tmp/x.sock` to see why.")
            time.sleep(0.02)
        forked = _startup_runs(repeats, {wire.SOCKET_VARIABLE: path}, server.pid)
    finally:
        server.terminate()
        server.wait()
        os.rmdir(folder)
    return {"cpu": forked["cpu"], "wall": forked["wall"], "own_cpu": own["cpu"], "own_wall": own["wall"]}


def _startup_runs(repeats: int, env: Mapping[str, str], server: int | None = None) -> dict[str, float]:
    import resource
    # One thread of each pool, as Snakemake sets them for a 1-thread job (and the fork server has them).
    env = {**os.environ, **wire.SERVER_THREADS, **env}
    cpu, wall = [], []
    for _ in range(max(repeats, 1)):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        served = _process_tree_cpu(server)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *STARTUP_PROBE], capture_output=True, text=True, check=True, env=env)
        wall.append(time.perf_counter() - start)
        if "note: fork server" in done.stderr:
            raise PipelineError(f"the start-up probe was not forked ({done.stderr.strip()}); unset the "
                                f"variables it names and rerun --calibrate.")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                   + _process_tree_cpu(server) - served)
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall)}


def _process_tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its reaped children (the fork server's jobs), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def measure_side_by_side(spec: Mapping[str, Any], copies: int) -> list[float]:
    """Seconds per unit of `copies` measurements of one unit run at once, as Snakemake runs 1-thread jobs
    side by side on a local machine (they share caches, memory bandwidth and, on SMT, cores)."""
    command, env = _measure_command(spec)
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(copies)]
    outputs = [(process.communicate(), process.returncode) for process in running]
    return [_measured(spec, code, out, err)["seconds"] for (out, err), code in outputs]


def calibrate(jobs: Sequence[Job], config: Mapping[str, Any], device: str, max_batch: int,
              repeats: int, log=print) -> dict[str, Any]:
    import torch
    units = {}
    load_before = os.getloadavg()
    for key in sorted(required_units(jobs, config)):
        units[key] = _run_measure(unit_spec(key, config, device, max_batch, repeats))
        log(f"  {key}: {units[key]['seconds']:.4g} s per unit, peak {units[key]['peak_mb']:.0f} MB")
    side_by_side = None
    copies = os.cpu_count() or 1
    # The first training and the first sampling unit: most of a plan's time, and they slow down differently.
    probes = [next(k for k in sorted(units) if k.startswith(kind)) for kind in ("train/", "sample/")
              if any(k.startswith(kind) for k in units)]
    if device == "cpu" and copies > 1 and probes:
        # How much slower a unit runs with one copy per core beside it: the local wall-clock estimate uses it.
        slowdowns = {}
        for probe in probes:
            times = measure_side_by_side(unit_spec(probe, config, device, max_batch, repeats), copies)
            slowdowns[probe] = statistics.median(times) / units[probe]["seconds"]
            log(f"  side by side: {probe} {slowdowns[probe]:.2f}x slower with {copies} copies at once")
        side_by_side = {"units": slowdowns, "copies": copies, "slowdown": statistics.mean(slowdowns.values())}
    startup = measure_startup(repeats)
    # On a GPU node the start-up is CPU work all the same; CPU seconds stay free of the load.
    log(f"  start-up: {startup['cpu']:.2f} s CPU per job forked by the fork server ({startup['wall']:.2f} s wall); "
        f"{startup['own_cpu']:.2f} s CPU in a process of its own (cluster jobs)")
    return {
        "device": device, "device_label": device_label(device),
        "device_name": _cpu_model() if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        # The units are timed in processes with OMP_NUM_THREADS (1 unless set), as 1-thread jobs run.
        "torch": torch.__version__, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "max_batch": max_batch, "repeats": repeats, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clock": "wall" if device != "cpu" else "process CPU seconds per thread",
        "startup_seconds": startup["cpu"], "startup_wall_seconds": startup["wall"],
        "startup_own_process_seconds": startup["own_cpu"], "units": units, "side_by_side": side_by_side,
    }


def write_calibration(path: Path, calibration: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(calibration, indent=1, sort_keys=True) + "\n")


def read_calibration(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"no calibration at {path}; run `python -m pipeline plan --calibrate` "
                            f"with the same config files (or pass --calibration FILE).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"calibration {path} is not valid JSON ({err}); rerun with --calibrate.") from None


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def format_estimate(costs: Sequence[RuleCost], stale_only: bool, calibration: Mapping[str, Any],
                    path: Path) -> str:
    lines = [f"{'stale' if stale_only else 'all'} jobs of the plan, costed with {path} "
             f"({calibration['device_name']}, torch {calibration['torch']}, {calibration['threads']} thread(s), "
             f"load {calibration['load_average_before'][0]:.1f} when calibrated, start-up "
             f"{calibration['startup_seconds']:.1f} s per job)",
             f"{'rule':<20} {'jobs':>5} {'device-h':>9} {'share':>6}  {'longest job':>12} {'runtime':>11}  "
             f"{'peak MB':>8} {'mem_mb':>7}"]
    total = total_seconds(costs)
    warnings = []
    for c in sorted(costs, key=lambda c: -c.seconds):
        runtime = "-" if c.runtime_minutes is None else _hms(c.runtime_minutes * 60)
        over_time = c.runtime_minutes is not None and c.longest_seconds > c.runtime_minutes * 60
        over_mem = c.peak_mb is not None and c.mem_mb is not None and c.peak_mb > c.mem_mb
        peak = "-" if c.peak_mb is None else f"{c.peak_mb:.0f}"
        mem = "-" if c.mem_mb is None else f"{c.mem_mb:.0f}"
        share = c.seconds / total if total else 0.0
        lines.append(f"{c.rule:<20} {c.jobs:>5} {c.seconds / 3600:>9.2f} {share:>6.1%}  "
                     f"{_hms(c.longest_seconds):>12} {runtime:>11}{'!' if over_time else ' '} "
                     f"{peak:>8} {mem:>7}{'!' if over_mem else ''}")
        if over_time:
            warnings.append(f"{c.rule}: the longest job ({_hms(c.longest_seconds)}) exceeds its runtime "
                            f"resource ({runtime}); raise it with --set-resources {c.rule}:runtime=MINUTES")
        if over_mem:
            warnings.append(f"{c.rule}: measured peak {c.peak_mb:.0f} MB exceeds mem_mb {c.mem_mb:.0f}")
    lines.append(f"{'total':<20} {sum(c.jobs for c in costs):>5} {total / 3600:>9.2f}")
    lines += wall_clock_lines(total, calibration)
    return "\n".join(lines + [f"warning: {w}" for w in warnings])


def wall_clock_lines(total_seconds_: float, calibration: Mapping[str, Any]) -> list[str]:
    """The local wall-clock estimate: the device-hours of 1-thread jobs run one per core, each slowed by
    the side-by-side factor calibration measured (ignores the tail where fewer jobs than cores are ready)."""
    side = calibration.get("side_by_side")
    if not side:
        return []
    wall = total_seconds_ * side["slowdown"] / side["copies"]
    # Calibrations from before the training probe hold one unit ("unit") instead of "units".
    units = side["units"] if "units" in side else {side["unit"]: side["slowdown"]}
    measured = ", ".join(f"{unit} {factor:.2f}x" for unit, factor in units.items())
    return [f"on this machine, {side['copies']} one-thread jobs at a time (--cores {side['copies']}), each "
            f"{side['slowdown']:.2f}x slower than alone (the mean of {measured}): about {_hms(wall)} of wall-clock"]


def run(args: argparse.Namespace) -> None:
    if args.measure is not None:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    configfiles = [str(path) for path in config_files(args)]
    config = load_config(configfiles)
    path = Path(args.calibration) if args.calibration else default_calibration_path(config, args.device)
    if args.calibrate:
        # Every work unit of the whole plan, whatever is stale now.
        every_job = planned_jobs(args.workdir, configfiles, everything=True)
        print(f"calibrating {len(required_units(every_job, config))} work units on {args.device} "
              f"(load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
        calibration = calibrate(every_job, config, args.device, args.max_batch, args.repeats,
                                log=lambda line: print(line, file=sys.stderr))
        write_calibration(path, calibration)
    calibration = read_calibration(path)
    jobs = planned_jobs(args.workdir, configfiles, everything=args.everything)
    costs = estimate(jobs, config, Timings.from_calibration(calibration))
    print(format_estimate(costs, not args.everything, calibration, path))
