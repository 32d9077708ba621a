"""How close each piece runs to the machine's limit, as ratios taken in one run:

1. job start-up: a trivial stage job (`quantize --help`) in its own process (as on SLURM, or
   PIPELINE_FORK_SERVER=off) and through the fork server (local Snakemake runs), against a bare
   `python -c 'import torch'`; the three interleaved, medians of --repeats;
2. sampling: GFLOP/s of the sample stage's loop (fmnist16, T' = --steps, one thread) against the
   single-thread fp32 matmul peak (a 1024^3 torch.mm), timed in interleaved rounds with part 3
   (best of each); FLOPs of one forward counted by
   torch.utils.flop_counter (convolutions and matmuls, the work that has a peak);
3. compiled vs eager: the same loop with the UNet's forward compiled as the pipeline compiles it
   (pipeline.nn.forward_compile), and the compile's cost in a new process with an empty inductor
   cache (a machine's first run) and again with that cache filled (every later process): from
   them, the forward work above which compiling pays, the number behind `forward_compile.min_gflop`
   (skipped with --no-compile).

Timings on a shared machine are noisy: read the ratios, with the load average printed beside them.

    python bench/overhead.py [--repeats 5] [--steps 10] [--batch 16] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.allocator import reexec_with_tuned_allocator

# Sampling is timed under the malloc settings its jobs run with (pipeline/allocator.py).
reexec_with_tuned_allocator()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.launch import wire  # noqa: E402
from pipeline.nn.forward_compile import compile_forward  # noqa: E402
from pipeline.nn.presets import build_unet  # noqa: E402
from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIFFUSION = {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}
PRESET, CHANNELS = "fmnist16", 1


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def job_seconds(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=True, cwd=REPO)
    seconds = time.perf_counter() - began
    if "note: fork server" in done.stderr:  # refused: it ran in its own process, not what we time
        raise SystemExit(done.stderr.strip())
    return seconds


def start_up(repeats: int) -> None:
    # One thread of each pool, as Snakemake sets them for a 1-thread job (and the server has them).
    env = {**os.environ, "PYTHONPATH": str(REPO), **wire.SERVER_THREADS}
    folder = tempfile.mkdtemp(prefix="bench-", dir="/tmp")
    path = os.path.join(folder, "s.sock")
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.launch.server", "--socket", path], env=env, cwd=REPO)
    while not os.path.exists(path):
        if server.poll() is not None:
            raise SystemExit("the fork server did not start")
        time.sleep(0.02)
    ready = time.perf_counter() - began
    commands = {
        "bare `import torch`": ([sys.executable, "-c", "import torch"], env),
        "job in its own process": ([sys.executable, "-m", "pipeline.launch", "quantize", "--help"],
                                   {**env, wire.SOCKET_VARIABLE: wire.OFF}),
        "job through the fork server": ([sys.executable, "-m", "pipeline.launch", "quantize", "--help"],
                                        {**env, wire.SOCKET_VARIABLE: path}),
    }
    times = {name: [] for name in commands}
    try:
        for _ in range(repeats):  # interleaved: load changes hit all three alike
            for name, (command, command_env) in commands.items():
                times[name].append(job_seconds(command, command_env))
    finally:
        server.terminate()
        server.wait()
        os.rmdir(folder)
    bare = statistics.median(times["bare `import torch`"])
    print(f"1. job start-up, wall s, median of {repeats} ({load()}); fork server ready after {ready:.1f} s, once")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"   {name:30s} {median:6.3f} s   {median / bare:5.2f}x a bare import torch")
    print(f"   forked / own process: {statistics.median(times['job through the fork server']) / statistics.median(times['job in its own process']):.3f}")


def _timed(call) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def sampling(steps: int, batch: int, repeats: int, compile_too: bool) -> None:
    torch.manual_seed(0)
    unet = build_unet(PRESET, in_channels=CHANNELS)
    size = unet.image_size
    settings = {"preset": PRESET, "resolution": size, "diffusion": DIFFUSION}
    model = build_sampling_model(settings, unet.state_dict(), torch.device("cpu"))
    diffusion = sampling_diffusion(settings, steps)
    x, t = torch.zeros(batch, CHANNELS, size, size), torch.full((batch,), 999)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    flops_per_image = counter.get_total_flops() / batch

    def batch_seconds(net) -> float:
        return _timed(lambda: sample_range(net, diffusion, seed=0, start=0, stop=batch, batch_size=batch,
                                           image_size=size))

    nets = {"eager": model}
    if compile_too:
        compiled = build_sampling_model(settings, unet.state_dict(), torch.device("cpu"))
        compile_forward(compiled, batch)
        with torch.no_grad():
            compiled(x, t)
        nets["compiled"] = compiled
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    with torch.no_grad():
        model(x, t)  # warm-up
    # Interleaved rounds (peak, eager, compiled), best of each: a load change hits all alike.
    best = {"peak": float("inf"), **{name: float("inf") for name in nets}}
    for _ in range(repeats):
        best["peak"] = min(best["peak"], _timed(lambda: torch.mm(a, b)))
        for name, net in nets.items():
            best[name] = min(best[name], batch_seconds(net))
    peak = 2 * 1024 ** 3 / best["peak"] / 1e9
    work = steps * batch * flops_per_image / 1e9
    print(f"2. sampling {PRESET}, T'={steps}, batch {batch}, 1 thread ({load()}): "
          f"{flops_per_image / 1e6:.1f} MFLOP per image-forward; best of {repeats} interleaved rounds")
    print(f"   single-thread matmul peak {peak:6.1f} GFLOP/s (1024^3 torch.mm)")
    print(f"   sampling (eager)          {work / best['eager']:6.1f} GFLOP/s   {work / best['eager'] / peak:5.1%} of peak   "
          f"({best['eager']:.2f} s per batch)")
    if not compile_too:
        print("3. compiled vs eager: skipped (--no-compile)")
        return
    print("3. compiled (torch.compile, inductor, as pipeline.nn.forward_compile does it)")
    print(f"   sampling (compiled)       {work / best['compiled']:6.1f} GFLOP/s   "
          f"{work / best['compiled'] / peak:5.1%} of peak   ({best['compiled']:.2f} s per batch)")
    print(f"   compiled / eager time: {best['compiled'] / best['eager']:.3f}  "
          f"(speed-up {best['eager'] / best['compiled']:.2f}x)")
    saved_per_gflop = (best["eager"] - best["compiled"]) / work
    with tempfile.TemporaryDirectory() as cache:
        cold = compile_seconds(batch, cache)
        warm = compile_seconds(batch, cache)
    for label, seconds in (("empty cache (first run)", cold), ("filled cache (later runs)", warm)):
        pays = (f"pays above {seconds / saved_per_gflop:,.0f} GFLOP of forwards "
                f"({seconds / saved_per_gflop * 1e9 / flops_per_image:,.0f} image-forwards of {PRESET})"
                if saved_per_gflop > 0 else "never pays: compiled is not faster")
        print(f"   compile in a new process, {label}: {seconds:5.1f} s; {pays}")


COMPILE_TIMER = """
import sys, time, torch
from pipeline.nn.forward_compile import compile_forward
from pipeline.stages.sample import build_sampling_model
from pipeline.nn.presets import build_unet
torch.set_num_threads(1)
batch, preset, channels = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
unet = build_unet(preset, in_channels=channels)
settings = {"preset": preset, "resolution": unet.image_size,
            "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}
model = build_sampling_model(settings, unet.state_dict(), torch.device("cpu"))
x = torch.zeros(batch, channels, unet.image_size, unet.image_size)
t = torch.full((batch,), 999)
began = time.perf_counter()
compile_forward(model, batch)
with torch.no_grad():
    model(x, t)
print(time.perf_counter() - began)
"""


def compile_seconds(batch: int, cache_dir: str) -> float:
    """Seconds to compile the forward and run its first batch, in a new process using `cache_dir`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", COMPILE_TIMER, str(batch), PRESET, str(CHANNELS)],
                            cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip part 3 (compiled vs eager)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_up(args.repeats)
    sampling(args.steps, args.batch, max(args.repeats, 2), not args.no_compile)


if __name__ == "__main__":
    main()
