"""Recipe overheads measured in one run on the same batch: SAM and fSGLD steps vs an Adam step
(each the train stage's own step, pipeline.training.step), and EMA + SWA bookkeeping as a share
of a step.

    python bench/train_step.py [--preset cifar10] [--batch 8] [--threads 2] [--repeats 9]

Every figure is a ratio of medians taken in this one process, interleaving the recipes so that
a noisy neighbour slows all of them alike. Goals: sam/adm <= 2.05 (two gradients are the floor,
2.0), fsgld/adm <= 1.05, averaging/step <= 3%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import distributed
from pipeline.config import load_config
from pipeline.diffusion.gaussian import create_diffusion
from pipeline.diffusion.timestep_sampler import UniformSampler
from pipeline.nn.presets import build_unet
from pipeline.optim.averages import EMA, SWA
from pipeline.recipes import resolve_recipe
from pipeline.training.draws import RandomImages, draw_step
from pipeline.training.optimizer import build_optimizer
from pipeline.training.step import TrainingStep

# The config's recipes timed, by the name printed: plain AdamW, SAM, fSGLD on the same AdamW base.
RECIPES = {"adm": "adm", "sam": "sam_rho0.1", "fsgld": "fsgld_adam"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # The train stage's step (pipeline.training.step) for each recipe, from the same weights and
    # on the same random images; the averages are timed on their own below.
    config, cpu = load_config(), torch.device("cpu")
    diffusion, sampler = create_diffusion(), UniformSampler(1000)
    ref = build_unet(args.preset)
    ref.train()
    batches = RandomImages(args.batch, ref.in_channels, ref.image_size)
    train_steps = {}
    for name, recipe_name in RECIPES.items():
        recipe = resolve_recipe(config, recipe_name)
        model = build_unet(args.preset)
        model.load_state_dict(ref.state_dict())
        model.train()
        train_steps[name] = TrainingStep(model, build_optimizer(model, recipe, 0), diffusion, sampler, recipe.name,
                                         seed=0, device=cpu, procs=distributed.Processes(), cuda={})
    batch = draw_step(batches, sampler, 0, 0, 0.0, cpu)

    # SWA collecting at every step, so each call measures a collection; the paper collects every
    # 100 steps, and the amortised share below divides by that.
    ema, swa = EMA(ref, decay=0.9999), SWA(ref, start_fraction=1e-6, every=1, total_steps=10**6)
    swa_every = 100

    # fSGLD's own cost: two N(0, I) draws over every parameter per step (perturbation and
    # Langevin noise), independent of the batch size.
    n_params = sum(p.numel() for p in ref.parameters())
    draw_buffer, draw_generator = torch.empty(n_params), torch.Generator().manual_seed(0)

    swa_step = iter(range(1, 10**6))
    steps = {name: (lambda step=step: step(batch, 0)) for name, step in train_steps.items()}
    steps.update({"ema": lambda: ema.update(ref), "swa": lambda: swa.update(ref, next(swa_step)),
                  "draw": lambda: draw_buffer.normal_(generator=draw_generator)})
    times = {name: [] for name in steps}
    for name, fn in steps.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"preset {args.preset}, batch {args.batch}, {args.threads} threads, {args.repeats} interleaved repeats")
    print(f"adm step: {1e3 * median['adm']:.0f} ms")
    print(f"sam/adm: {median['sam'] / median['adm']:.2f}x")
    print(f"fsgld/adm: {median['fsgld'] / median['adm']:.2f}x (of which two N(0, I) draws over "
          f"{n_params / 1e6:.1f}M parameters: {2 * median['draw'] / median['adm']:.2f}; this part does "
          f"not grow with the batch)")
    averaging = median["ema"] + median["swa"] / swa_every
    print(f"averaging/step: {100 * averaging / median['adm']:.1f}% (EMA every step + SWA every {swa_every}; "
          f"EMA alone {100 * median['ema'] / median['adm']:.1f}%, one SWA collection "
          f"{100 * median['swa'] / median['adm']:.1f}%)")


if __name__ == "__main__":
    main()
