"""glibc's malloc defaults against the pipeline's tunables (pipeline/allocator.py), per work unit.

Each unit is timed in a fresh process by `python -m pipeline plan --measure`, exactly as
`plan --calibrate` times it, once with PIPELINE_ALLOCATOR=system and once with the tunables, the
rounds interleaved so that a change of load hits both alike. Prints per unit the median seconds per
unit of each, their ratio and each one's peak resident memory; then the SHA-256 of the same sampling
batch (uint8 images) under each, which must be equal; with the load average.

    python bench/allocator.py [--configfile config.yaml config/cpu-study.yaml] [--max-batch 500]
                              [--rounds 3] [--units KEY ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from pipeline.allocator import CHOICE_VARIABLE
from pipeline.config import load_config
from pipeline.stages.plan import unit_spec

# The CPU study's work units: sampling, the measures' loss forwards, the Hessian's products,
# training steps (Adam and SAM), feature extraction and the FD job's fixed part.
UNITS = ("sample/fmnist16/16px/c1/b500", "loss/fmnist16/16px/c1/b500", "loss/fmnist16/16px/c1/b256",
         "hvp/fmnist16/16px/c1/b64", "train/fmnist16/16px/c1/b64/adamw", "train/fmnist16/16px/c1/b64/adamw+sam",
         "extract/effnet-lite0-32px/16px/c1", "fid_fixed/effnet-lite0-32px/n2000")

SAMPLE_DIGEST = """
from pipeline.allocator import reexec_with_tuned_allocator
reexec_with_tuned_allocator()  # as the entry points do
import hashlib, os, torch
from pipeline.nn.presets import build_unet
from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion
torch.set_num_threads(1)
torch.manual_seed(0)
unet = build_unet("fmnist16", in_channels=1)
for p in unet.parameters():
    torch.nn.init.normal_(p, std=0.05)  # trained-like: ADM zero-initialises its output layers
settings = {"preset": "fmnist16", "resolution": 16,
            "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}
model = build_sampling_model(settings, unet.state_dict(), torch.device("cpu"))
images = sample_range(model, sampling_diffusion(settings, 20), seed=0, start=0, stop=500, batch_size=500,
                      image_size=16)
print(hashlib.sha256(images.tobytes()).hexdigest(), os.environ.get("GLIBC_TUNABLES"))
"""


def environment(choice: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, CHOICE_VARIABLE: choice, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measured(spec: dict, choice: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--measure", json.dumps(spec)],
                          capture_output=True, text=True, env=environment(choice), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="+", default=["config.yaml", "config/cpu-study.yaml"])
    parser.add_argument("--max-batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timings per unit in each process (median)")
    parser.add_argument("--units", nargs="+", default=list(UNITS))
    args = parser.parse_args()
    config = load_config(args.configfile)
    print(f"{len(args.units)} units, {args.rounds} interleaved rounds of fresh processes, 1 thread ({load()})")
    print(f"{'unit':42s} {'system s':>10s} {'tuned s':>10s} {'tuned/system':>13s} {'peak MB sys/tuned':>18s}")
    choices = ("system", "tuned")
    for key in args.units:
        spec = unit_spec(key, config, "cpu", args.max_batch, args.repeats)
        runs = {choice: [] for choice in choices}
        for _ in range(args.rounds):
            for choice in choices:
                runs[choice].append(measured(spec, choice))
        seconds = {c: statistics.median(r["seconds"] for r in runs[c]) for c in choices}
        peak = {c: max(r["peak_mb"] for r in runs[c]) for c in choices}
        print(f"{key:42s} {seconds['system']:10.5f} {seconds['tuned']:10.5f} "
              f"{seconds['tuned'] / seconds['system']:13.3f} {peak['system']:8.0f}/{peak['tuned']:<8.0f}")
    digests = {c: subprocess.run([sys.executable, "-c", SAMPLE_DIGEST], capture_output=True, text=True,
                                 env=environment(c), check=True).stdout.split()[0] for c in choices}
    same = "identical" if digests["system"] == digests["tuned"] else "DIFFERENT"
    print(f"sampling 500 images at T'=20 (uint8): SHA-256 {digests['system'][:16]} (system) "
          f"{digests['tuned'][:16]} (tuned): {same}")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
