"""UNet cost on this machine: training step, no-grad forward, and 20-step sampling.

    python bench/unet_step.py [--preset cifar10] [--batch 8] [--threads 2] [--repeats 7]

Prints the parameter count, the median milliseconds of forward + backward + Adam step (after
warm-up), the median milliseconds of a no-grad forward, and the seconds to sample `batch` images
at T' = 20, all fp32. The project's goal is at most 0.9x guided-diffusion's time for the same
work on the same machine (measured side by side; see the closing notes of the issues).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.diffusion.gaussian import create_diffusion
from pipeline.diffusion.sampler import sample_images
from pipeline.nn.presets import build_unet


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_unet(args.preset)
    size, channels = model.image_size, model.in_channels
    x = torch.randn(args.batch, channels, size, size)
    t = torch.randint(0, 1000, (args.batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    print(f"preset {args.preset}, batch {args.batch}, {args.threads} threads, fp32")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(x, t)[:, :channels].square().mean().backward()
        optimizer.step()

    model.train()
    print(f"train step (fwd+bwd+Adam): median {1e3 * statistics.median(timed(train_step, args.repeats)):.0f} ms")

    model.eval()
    with torch.no_grad():
        forward = timed(lambda: model(x, t), args.repeats)
    print(f"forward (no grad): median {1e3 * statistics.median(forward):.0f} ms")

    diffusion = create_diffusion(timestep_respacing=str(args.sample_steps))
    seeds = list(range(args.batch))
    shape = (args.batch, channels, size, size)
    sampling = timed(lambda: sample_images(model, diffusion, shape, seeds), max(1, args.repeats // 3), warmup=0)
    print(f"sample {args.batch} images at T'={args.sample_steps}: median {statistics.median(sampling):.1f} s")


if __name__ == "__main__":
    main()
