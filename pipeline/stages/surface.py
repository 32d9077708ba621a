"""2-D loss surface along two filter-normalised random directions (Li et al. 2018).

losses[i, j] = L(theta + x[i] delta + y[j] eta) on a grid x grid lattice over [-span, span]^2.
The raw Gaussian draws behind delta and eta come from --seed, so models compared with the same
seed share them; each model rescales them to its own filters (per output slice of every tensor
with >= 2 dims), and biases and normalisation parameters get a zero direction (ignore=biasbn).
The loss is the per-sample training loss on the fixed evaluation set of n_eval (x0, t, eps)
triples (terms recorded); model in eval mode, float32.

Cost: grid^2 * ceil(n_eval / batch_size) forward passes of batch_size images: quadratic in grid,
linear in n_eval. Memory: three copies of the parameters plus one batch.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.arguments import int_at_least, positive_float, positive_int
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import effective_terms, evaluation_loss, load_evaluation_set
from pipeline.flatness.model_setup import build_diffusion
from pipeline.flatness.surface import IGNORE_CHOICES, grid_coordinates, loss_surface
from pipeline.flatness.weights import trainable_parameters
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, ticker, write_results

NAME = "surface"
DEFAULTS = {"grid": 21, "span": 1.0, "n_eval": 1000, "ignore": "biasbn",
            "seed": 0, "batch_size": 256, "terms": "mse+vb"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME)
    parser.add_argument("--grid", type=int_at_least(3), default=SUPPRESS, help="points per axis (built-in 21)")
    parser.add_argument("--span", type=positive_float, default=SUPPRESS,
                        help="the grid covers [-span, span] on both axes (built-in 1.0)")
    parser.add_argument("--n-eval", dest="n_eval", type=positive_int, default=SUPPRESS,
                        help="evaluation triples (built-in 1000)")
    parser.add_argument("--ignore", choices=IGNORE_CHOICES, default=SUPPRESS,
                        help="biasbn: zero direction on tensors with <= 1 dim; none: their own values "
                             "(built-in biasbn)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    if int(s["grid"]) < 1 or float(s["span"]) < 0:
        raise PipelineError("grid must be >= 1 and span >= 0.")
    diffusion = build_diffusion(ctx.model_settings)
    terms = effective_terms(diffusion, s["terms"])
    evalset = load_evaluation_set(ctx.data_path, int(s["n_eval"]), int(s["seed"]), diffusion.num_timesteps)
    coordinates = grid_coordinates(int(s["grid"]), float(s["span"]))

    def loss_fn() -> float:
        return evaluation_loss(ctx.model, diffusion, evalset, int(s["batch_size"]), terms)

    # The origin, when on the grid, reuses L(theta).
    evaluations = 1 + len(coordinates) ** 2 - int(np.count_nonzero(coordinates == 0.0)) ** 2
    ctx.compile_forward(evaluations * len(evalset), min(int(s["batch_size"]), len(evalset)))
    with ctx.bar(evaluations, f"{int(s['grid'])}x{int(s['grid'])} grid", unit="grid points") as bar:
        result = loss_surface(trainable_parameters(ctx.model), loss_fn, coordinates, coordinates,
                              int(s["seed"]), ignore=s["ignore"], on_evaluation=ticker(bar))
    write_results(ctx, args, {
        "x": result.x, "y": result.y, "losses": result.losses, "loss": result.loss,
        "direction_norms": np.array(result.direction_norms), "direction_cosine": result.direction_cosine,
    }, extra={
        "loss_terms": terms, "evaluation_set": evalset.describe(),
        "normalisation": f"filter (per output slice), ignore={s['ignore']}",
        "layout": "losses[i, j] = L(theta + x[i] * delta + y[j] * eta)",
    })
