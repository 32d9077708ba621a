"""LPF flatness: the training loss averaged over Gaussian weight noise, E L(theta + N(0, sigma^2 I)).

Writes L(theta), LPF, LPF - L(theta) and the Monte-Carlo standard error at `sigma`, and the same
for every sigma of `sigma_sweep` (all sigmas share the draws: common random numbers). The loss is
the per-sample training loss (terms recorded) on the fixed evaluation set of n_eval (x0, t, eps)
triples drawn from --seed, the same for every model; model in eval mode, float32.

Cost: (1 + S * draws) * ceil(n_eval / batch_size) forward passes of batch_size images, where S is
the number of distinct sigmas (sigma and the sweep); linear in draws, n_eval and S. Memory: two
copies of the parameters plus one batch.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import effective_terms, evaluation_loss, load_evaluation_set
from pipeline.flatness.lpf import low_pass_loss
from pipeline.flatness.model_setup import build_diffusion
from pipeline.flatness.weights import trainable_parameters
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, ticker, write_results

NAME = "lpf"
DEFAULTS = {"sigma": 0.01, "draws": 100, "n_eval": 10000, "sigma_sweep": [0.001, 0.005, 0.01],
            "seed": 0, "batch_size": 256, "terms": "mse+vb"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME)
    parser.add_argument("--sigma", type=float, default=SUPPRESS,
                        help="std of the i.i.d. weight noise on every trainable parameter (built-in 0.01)")
    parser.add_argument("--draws", type=int, default=SUPPRESS, help="Monte-Carlo draws M (built-in 100)")
    parser.add_argument("--n-eval", dest="n_eval", type=int, default=SUPPRESS,
                        help="evaluation triples (built-in 10000)")
    parser.add_argument("--sigma-sweep", dest="sigma_sweep", type=float, nargs="*", default=SUPPRESS,
                        help="further sigmas on the same draws; give the flag alone for none "
                             "(built-in 0.001 0.005 0.01)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    if s["sigma"] < 0 or any(x < 0 for x in s["sigma_sweep"]):
        raise PipelineError("sigma and every sigma_sweep value must be >= 0.")
    diffusion: GaussianDiffusion = build_diffusion(ctx.model_settings)
    terms = effective_terms(diffusion, s["terms"])
    evalset = load_evaluation_set(ctx.data_path, int(s["n_eval"]), int(s["seed"]), diffusion.num_timesteps)
    sigmas = sorted({float(s["sigma"]), *(float(x) for x in s["sigma_sweep"])})

    def loss_fn() -> float:
        return evaluation_loss(ctx.model, diffusion, evalset, int(s["batch_size"]), terms)

    with ctx.bar(1 + len(sigmas) * int(s["draws"]), "loss evaluations") as bar:
        results = low_pass_loss(trainable_parameters(ctx.model), loss_fn, sigmas, int(s["draws"]),
                                int(s["seed"]), on_evaluation=ticker(bar))
    main = results[sigmas.index(float(s["sigma"]))]
    arrays = {
        "sigma": main.sigma, "loss": main.loss, "lpf": main.lpf, "difference": main.difference,
        "stderr": main.stderr, "draw_losses": main.draw_losses,
        "sweep/sigma": np.array(sigmas),
        "sweep/lpf": np.array([r.lpf for r in results]),
        "sweep/difference": np.array([r.difference for r in results]),
        "sweep/stderr": np.array([r.stderr for r in results]),
        "sweep/draw_losses": np.stack([r.draw_losses for r in results]),
    }
    write_results(ctx, args, arrays, extra={
        "loss_terms": terms, "evaluation_set": evalset.describe(),
        "noise": "i.i.d. N(0, sigma^2) on every trainable parameter, raw weights (no reparametrisation)",
    })
