"""GroupNorm on channels-last activations: PyTorch's kernel against pipeline.nn.channels_last_norm,
on one thread, as the sample stage runs the UNet on the CPU.

Prints, in one run (rounds interleaved, so a change of load hits every variant alike):
  - per GroupNorm shape of the fmnist16 forward at batch 250: milliseconds for PyTorch's kernel on
    channels-last input, ours on the same input, and PyTorch's on NCHW input (the fast case);
  - the whole forward per preset and batch: NCHW, channels-last with PyTorch's norm, channels-last
    with ours; median seconds, ratios, and each one's largest error against a float64 forward.

    python bench/group_norm.py [--rounds 15] [--configs fmnist16:16 fmnist16:250 cifar10:8]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.nn.channels_last_norm import group_norm_channels_last, use_channels_last_group_norm
from pipeline.nn.presets import build_unet
from pipeline.nn.unet import GroupNorm32


def trained_like(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    channels = 1 if preset == "fmnist16" else 3
    model = build_unet(preset, in_channels=channels).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # ADM zero-initialises its output layers
    return model


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def norm_shapes(model: torch.nn.Module, batch: int) -> list[tuple[tuple[int, ...], GroupNorm32]]:
    """The input shape of every distinct GroupNorm the forward calls."""
    seen: dict[tuple[int, ...], GroupNorm32] = {}

    def record(module: GroupNorm32, args: tuple) -> None:
        seen.setdefault((*args[0].shape, module.num_groups), module)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, GroupNorm32)]
    with torch.no_grad():
        model(torch.randn(batch, model.in_channels, model.image_size, model.image_size),
              torch.zeros(batch, dtype=torch.int64))
    for h in hooks:
        h.remove()
    return sorted(seen.items(), key=lambda item: -item[0][1] * item[0][2] * item[0][3])


def per_norm(rounds: int) -> None:
    print("GroupNorm alone, fmnist16 shapes at batch 250 (median ms):")
    print(f"  {'shape (N, C, H, W) / groups':<30} {'torch, NHWC':>12} {'ours, NHWC':>11} {'torch, NCHW':>12}")
    for (*shape, groups), module in norm_shapes(trained_like("fmnist16"), 250):
        if len(shape) != 4:  # attention's norm sees (N, C, H*W): no channels-last layout
            continue
        x = (torch.randn(shape) * 0.5 + 1.0).contiguous(memory_format=torch.channels_last)
        x_nchw = x.contiguous()
        w, b = module.weight.detach(), module.bias.detach()
        runs = {"torch_nhwc": lambda: F.group_norm(x, groups, w, b, 1e-5),
                "ours": lambda: group_norm_channels_last(x, groups, w, b, 1e-5),
                "torch_nchw": lambda: F.group_norm(x_nchw, groups, w, b, 1e-5)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds * 3):
            for name, fn in runs.items():
                times[name].append(timed(fn))
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"  {str(tuple(shape)) + f' / {groups}':<30} {ms['torch_nhwc']:>12.2f} {ms['ours']:>11.2f} "
              f"{ms['torch_nchw']:>12.2f}")


def whole_forward(preset: str, batch: int, rounds: int) -> None:
    nchw = trained_like(preset)
    torch_nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    ours = use_channels_last_group_norm(copy.deepcopy(torch_nhwc))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, nchw.in_channels, nchw.image_size, nchw.image_size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    x_last = x.contiguous(memory_format=torch.channels_last)
    variants = {"NCHW": (nchw, x), "NHWC, torch's norm": (torch_nhwc, x_last), "NHWC, our norm": (ours, x_last)}
    with torch.no_grad():
        exact = copy.deepcopy(nchw).double()(x.double(), t)
        errors = {k: float((m(inp, t).double() - exact).abs().max()) for k, (m, inp) in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, (model, inp) in variants.items():
                times[name].append(timed(lambda: model(inp, t)))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    base = seconds["NHWC, torch's norm"]
    print(f"{preset} forward at batch {batch} (median of {rounds}; load {os.getloadavg()[0]:.2f}):")
    for name, s in seconds.items():
        print(f"  {name:<20} {s:8.4f} s  {s / base:6.3f}x of NHWC with torch's norm   "
              f"max error vs float64 {errors[name]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--configs", nargs="+", default=["fmnist16:16", "fmnist16:250", "cifar10:8"],
                        help="preset:batch pairs for the whole-forward comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f} at the start")
    per_norm(args.rounds)
    for config in args.configs:
        preset, batch = config.split(":")
        whole_forward(preset, int(batch), args.rounds)


if __name__ == "__main__":
    main()
