"""Loss under perturbation: L(theta + gamma u) against the perturbation norm gamma.

K random unit directions u over the flattened parameter vector (seeded by --seed, the same for
every model of one architecture); per gamma the mean and standard deviation over directions of
the loss and of its increase over L(theta), and gamma / ||theta||. The loss is the per-sample
training loss on the fixed evaluation set of n_eval (x0, t, eps) triples (terms recorded); model
in eval mode, float32.

Cost: (1 + directions * R) * ceil(n_eval / batch_size) forward passes of batch_size images, R the
number of non-zero radii; linear in directions, radii and n_eval. Memory: two copies of the
parameters plus one batch.
"""

from __future__ import annotations

import argparse

from pipeline.arguments import nonnegative_float, positive_int
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import effective_terms, evaluation_loss, load_evaluation_set
from pipeline.flatness.model_setup import build_diffusion
from pipeline.flatness.perturbation import loss_along_directions
from pipeline.flatness.weights import trainable_parameters
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, ticker, write_results

NAME = "perturbation"
DEFAULTS = {"radii": [float(r) for r in range(0, 101, 10)], "directions": 20, "n_eval": 2000,
            "seed": 0, "batch_size": 256, "terms": "mse+vb"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME)
    parser.add_argument("--radii", type=nonnegative_float, nargs="+", default=SUPPRESS,
                        help="perturbation norms gamma (built-in 0, 10, ..., 100)")
    parser.add_argument("--directions", type=positive_int, default=SUPPRESS, help="random directions K (built-in 20)")
    parser.add_argument("--n-eval", dest="n_eval", type=positive_int, default=SUPPRESS,
                        help="evaluation triples (built-in 2000)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    radii = [float(r) for r in s["radii"]]
    if not radii or min(radii) < 0:
        raise PipelineError("radii must be a non-empty list of norms >= 0.")
    diffusion = build_diffusion(ctx.model_settings)
    terms = effective_terms(diffusion, s["terms"])
    evalset = load_evaluation_set(ctx.data_path, int(s["n_eval"]), int(s["seed"]), diffusion.num_timesteps)

    nonzero = sum(1 for r in radii if r != 0.0)
    ctx.compile_forward((1 + int(s["directions"]) * nonzero) * len(evalset),
                        min(int(s["batch_size"]), len(evalset)))

    def loss_fn() -> float:
        return evaluation_loss(ctx.model, diffusion, evalset, int(s["batch_size"]), terms)

    with ctx.bar(1 + int(s["directions"]) * nonzero,
                 f"{int(s['directions'])} directions x {nonzero} radii") as bar:
        result = loss_along_directions(trainable_parameters(ctx.model), loss_fn, radii, int(s["directions"]),
                                       int(s["seed"]), on_evaluation=ticker(bar))
    write_results(ctx, args, {
        "radii": result.radii, "relative_radii": result.relative_radii, "losses": result.losses,
        "loss": result.loss, "parameter_norm": result.parameter_norm,
        "loss_mean": result.mean, "loss_std": result.std,
        "difference_mean": result.difference_mean, "difference_std": result.difference_std,
    }, extra={
        "loss_terms": terms, "evaluation_set": evalset.describe(),
        "directions_kind": "uniform on the unit sphere of all trainable parameters, no filter normalisation",
        "std_convention": "sample standard deviation over directions (ddof 1)",
    })
