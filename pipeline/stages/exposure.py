"""Exposure bias: ||eps_theta|| per respaced timestep, training inputs vs the sampling chain.

For each T' in `steps`, at every chain index k of the T'-step respaced diffusion:
"training" runs the model on x_t = q(x_t | x0) from n_images training images (a seeded subset)
with fresh noise; "sampling" runs the model's own ancestral chain from n_images seeded x_T.
Stored per k: mean and standard error over images of the L2 norm of the predicted eps over
C x H x W and of its square, the per-image norms, and the gap sampling - training per k, its
mean over k (gap_l2_mean, the ADM-ES-style default) and sum (gap_l2_sum), with squared-norm
variants; the convention is named in the file. Reference: sqrt(C H W) for an exact N(0, I)
prediction. Model in eval mode, float32; samples use clip_denoised.

Cost: 2 * n_images * sum(steps) image forward passes (2 * n_images * 120 for steps 20 and 100),
in batches of batch_size; linear in n_images and in the total step count. Memory: one batch of
images plus n_images * sum(steps) stored norms.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.arguments import positive_int
from pipeline.data.hdf5 import read_images
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import image_subset
from pipeline.flatness.exposure import (GAP_CONVENTION, exposure_gap, reference_norm, sampling_curve,
                                        training_curve)
from pipeline.flatness.model_setup import build_diffusion
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, write_results

NAME = "exposure"
DEFAULTS = {"n_images": 10000, "steps": [20, 100], "batch_size": 256, "clip_denoised": True, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME, loss_based=False)
    parser.add_argument("--n-images", dest="n_images", type=positive_int, default=SUPPRESS,
                        help="images per curve (built-in 10000)")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=SUPPRESS,
                        help="respaced step counts T' (built-in 20 100)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    count, seed, batch_size = int(s["n_images"]), int(s["seed"]), int(s["batch_size"])
    steps_list = [int(k) for k in s["steps"]]
    if not steps_list or min(steps_list) < 1:
        raise PipelineError("steps must be a non-empty list of step counts >= 1.")
    images = read_images(ctx.data_path, image_subset(ctx.data_shape[0], count, seed))
    image_shape = ctx.image_shape
    # Each image passes every step of each chain twice: on training inputs and along its own chain.
    ctx.compile_forward(2 * count * sum(steps_list), min(batch_size, count))

    arrays: dict[str, object] = {"reference_l2": reference_norm(image_shape),
                                 "reference_sq": float(np.prod(image_shape)),
                                 "steps": np.array(steps_list)}
    for steps in steps_list:
        diffusion = build_diffusion(ctx.model_settings, timestep_respacing=str(steps))
        with ctx.bar(count, f"T'={steps} training", unit="images") as bar:
            training = training_curve(ctx.model, diffusion, images, seed, batch_size, on_batch=bar.update)
        with ctx.bar(count, f"T'={steps} sampling", unit="images") as bar:
            sampling = sampling_curve(ctx.model, diffusion, count, image_shape, seed, batch_size,
                                      clip_denoised=bool(s["clip_denoised"]), on_batch=bar.update)
        group = f"steps{steps}"
        arrays[f"{group}/timesteps"] = np.array(diffusion.timestep_map)
        for label, curve in (("training", training), ("sampling", sampling)):
            arrays[f"{group}/{label}/l2"] = curve.l2.astype(np.float32)
            for kind, squared in (("l2", False), ("sq", True)):
                arrays[f"{group}/{label}/{kind}_mean"] = curve.mean(squared)
                arrays[f"{group}/{label}/{kind}_stderr"] = curve.stderr(squared)
        for kind, squared in (("l2", False), ("sq", True)):
            gap = exposure_gap(training, sampling, squared)
            arrays[f"{group}/gap/{kind}"] = gap.per_t
            arrays[f"{group}/gap/{kind}_stderr"] = gap.per_t_stderr
            arrays[f"{group}/gap_{kind}_mean"] = gap.mean
            arrays[f"{group}/gap_{kind}_mean_stderr"] = gap.mean_stderr
            arrays[f"{group}/gap_{kind}_sum"] = gap.total
            arrays[f"{group}/gap_{kind}_sum_stderr"] = gap.total_stderr
    write_results(ctx, args, arrays, extra={
        "gap_convention": GAP_CONVENTION,
        "index_order": "arrays over t are indexed by the chain index k = 0..T'-1 (k = T'-1 is the "
                       "first sampling step); stepsK/timesteps[k] is the original timestep",
        "image_selection": "seeded permutation prefix of the data set (eval_set stream)",
    })
