"""Sampling speed: images per second at T' = 20 for the cifar10 and demo presets, batch 8, 2 threads.

Times the sample stage's own path (`pipeline.stages.sample.sample_range`: per-image seeded
ancestral DDPM over the respaced cosine chain, clipped x_0, uint8 conversion) on the CPU, fp32,
with freshly initialised weights (speed does not depend on their values). One warm-up model call,
then the median of --repeats full sampling runs. cifar10 images are RGB 32x32; demo images are
grayscale 32x32 (Fashion-MNIST), as in config.yaml.

For comparison, the reference implementation (guided-diffusion) took 20-30 s for 8 cifar10
images at T' = 20 on this kind of machine (0.27-0.40 images/s); the goal is at most 0.9x its time.

    python bench/sample.py [--repeats 3] [--presets cifar10 demo]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.nn.presets import build_unet
from pipeline.stages.sample import build_sampling_model, sample_range, sampling_diffusion

CHANNELS = {"cifar10": 3, "demo": 1, "adm64": 3, "tiny": 3}
DIFFUSION = {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}


def images_per_second(preset: str, steps: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """(images/s, wall seconds per batch, CPU seconds per batch), medians over `repeats` batches.

    CPU seconds (all threads) show how much of the wall time other processes took on a shared
    machine: with 2 threads and the cores to itself, wall is about CPU / 2.
    """
    torch.manual_seed(0)
    weights = build_unet(preset, in_channels=CHANNELS[preset]).state_dict()
    image_size = build_unet(preset, in_channels=CHANNELS[preset]).image_size
    settings = {"preset": preset, "resolution": image_size, "diffusion": DIFFUSION}
    model = build_sampling_model(settings, weights, torch.device("cpu"))
    diffusion = sampling_diffusion(settings, steps)

    x = torch.zeros(batch, CHANNELS[preset], image_size, image_size)
    with torch.no_grad():
        model(x, torch.full((batch,), 999))
    wall, cpu = [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        sample_range(model, diffusion, seed=0, start=0, stop=batch, batch_size=batch, image_size=image_size)
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    per_batch = statistics.median(wall)
    return batch / per_batch, per_batch, statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cifar10", "demo"], choices=sorted(CHANNELS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        rate, per_batch, cpu = images_per_second(preset, args.steps, args.batch, args.repeats)
        note = "  (reference: 20-30 s per batch)" if preset == "cifar10" and args.batch == 8 else ""
        print(f"sample {preset:8s} T'={args.steps} batch {args.batch} threads {args.threads}: "
              f"{rate:.3f} images/s, {per_batch:.1f} s per batch ({cpu:.1f} CPU s; median of "
              f"{args.repeats}){note}",
              flush=True)


if __name__ == "__main__":
    main()
