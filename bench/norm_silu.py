"""GroupNorm + SiLU: the fmnist16 forward with SiLU overwriting each norm's output (in place, as
pipeline/nn/unet.py builds it) against out of place, batch 16, one thread, channels-last as the
sample stage runs it. Prints the largest output difference (0: bit-identical) and the time ratio
over interleaved rounds, with the load average.

    python bench/norm_silu.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from pipeline.nn.presets import build_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    in_place = build_unet("fmnist16", in_channels=1)
    for p in in_place.parameters():
        torch.nn.init.normal_(p, std=0.05)  # trained-like: ADM zero-initialises its output layers
    in_place = in_place.eval().to(memory_format=torch.channels_last)
    out_of_place = copy.deepcopy(in_place)
    for module in out_of_place.modules():
        if isinstance(module, torch.nn.SiLU):
            module.inplace = False
    x = torch.randn(16, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (16,))

    def seconds(model) -> float:
        began = time.perf_counter()
        for _ in range(5):
            model(x, t)
        return (time.perf_counter() - began) / 5

    with torch.no_grad():
        difference = (in_place(x, t) - out_of_place(x, t)).abs().max().item()
        ratios = [seconds(in_place) / seconds(out_of_place) for _ in range(args.rounds)]
    print(f"fmnist16 forward, batch 16, 1 thread, load average {os.getloadavg()[0]:.2f}: in-place / "
          f"out-of-place SiLU time {statistics.median(ratios):.3f} (median of {args.rounds} interleaved "
          f"rounds), largest output difference {difference:g}")


if __name__ == "__main__":
    main()
