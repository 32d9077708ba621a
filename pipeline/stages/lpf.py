"""LPF flatness: the training loss averaged over Gaussian weight noise, E L(theta + delta).

For each noise scaling of `scalings` (pipeline.flatness.lpf: "absolute", delta = sigma z; "filter",
the noise of each filter proportional to its norm) writes L(theta), LPF, LPF - L(theta) and the
Monte-Carlo standard error at `sigma`, and the same for every sigma of `sigma_sweep`. All scalings
and sigmas share the draws z_m (common random numbers). The loss is the per-sample training loss
(terms recorded) on the fixed evaluation set of n_eval (x0, t, eps) triples drawn from --seed,
the same for every model; model in eval mode, float32.

Output layout (HDF5):

* top level, the values the report reads: the absolute scaling's `sigma`, `loss`, `lpf`,
  `difference`, `stderr`, `draw_losses` (M,), and `sweep/{sigma, lpf, difference, stderr}` (S,),
  `sweep/draw_losses` (S, M); "absolute" must therefore be one of the scalings.
* per scaling, a group `<scaling>/` (`absolute/`, `filter/`) with what depends on the scaling:
  `lpf`, `difference`, `stderr`, `draw_losses` (M,) at `sigma`, and `sweep/{lpf, difference,
  stderr}` (S,), `sweep/draw_losses` (S, M) over the top-level `sweep/sigma`. `sigma`, `loss` and
  `sweep/sigma` are shared and stay at the top level.
* attrs: `scalings` (comma-separated, in file order), `top_level_scaling` ("absolute"), and
  `noise_<scaling>` describing each scaling; `noise` is kept for the absolute one.

Cost: (1 + K * S * draws) * ceil(n_eval / batch_size) forward passes of batch_size images, where K
is the number of scalings and S the number of distinct sigmas (sigma and the sweep). Memory: two
copies of the parameters, one scaled copy of the draw, plus one batch.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.arguments import positive_float, positive_int
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import effective_terms, evaluation_loss, load_evaluation_set
from pipeline.flatness.lpf import SCALINGS, LPFResult, low_pass_loss
from pipeline.flatness.model_setup import build_diffusion
from pipeline.flatness.weights import trainable_parameters
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, ticker, write_results

NAME = "lpf"
DEFAULTS = {"sigma": 0.01, "draws": 100, "n_eval": 10000, "sigma_sweep": [0.001, 0.005, 0.01],
            "seed": 0, "batch_size": 256, "terms": "mse+vb", "scalings": ["absolute", "filter"]}
NOISE = {
    "absolute": "i.i.d. N(0, sigma^2) on every trainable parameter, raw weights (no reparametrisation)",
    "filter": "N(0, (sigma r)^2) per element, r fixed at theta: r = ||W[k]||_2 for every element of "
              "output filter k (slice k along dim 0) of a tensor with >= 2 dims; r = ||b||_2 / sqrt(n) "
              "(root mean square) for every element of a tensor b with <= 1 dim (n elements); same z as "
              "absolute",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME)
    parser.add_argument("--sigma", type=positive_float, default=SUPPRESS,
                        help="noise std: per parameter (absolute scaling), per unit filter norm (filter) (built-in 0.01)")
    parser.add_argument("--draws", type=positive_int, default=SUPPRESS, help="Monte-Carlo draws M (built-in 100)")
    parser.add_argument("--n-eval", dest="n_eval", type=positive_int, default=SUPPRESS,
                        help="evaluation triples (built-in 10000)")
    parser.add_argument("--sigma-sweep", dest="sigma_sweep", type=positive_float, nargs="*", default=SUPPRESS,
                        help="further sigmas on the same draws; give the flag alone for none "
                             "(built-in 0.001 0.005 0.01)")
    parser.add_argument("--scalings", nargs="+", choices=SCALINGS, default=SUPPRESS,
                        help="noise scalings on the same draws; must include absolute "
                             "(built-in absolute filter)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    if s["sigma"] < 0 or any(x < 0 for x in s["sigma_sweep"]):
        raise PipelineError("sigma and every sigma_sweep value must be >= 0.")
    diffusion: GaussianDiffusion = build_diffusion(ctx.model_settings)
    terms = effective_terms(diffusion, s["terms"])
    evalset = load_evaluation_set(ctx.data_path, int(s["n_eval"]), int(s["seed"]), diffusion.num_timesteps)
    sigmas = sorted({float(s["sigma"]), *(float(x) for x in s["sigma_sweep"])})
    scalings = checked_scalings(s["scalings"])

    evaluations = 1 + len(scalings) * len(sigmas) * int(s["draws"])
    ctx.compile_forward(evaluations * len(evalset), min(int(s["batch_size"]), len(evalset)))

    def loss_fn() -> float:
        return evaluation_loss(ctx.model, diffusion, evalset, int(s["batch_size"]), terms)

    with ctx.bar(evaluations,
                 f"{int(s['draws'])} draws x {len(sigmas)} sigmas x {len(scalings)} scalings") as bar:
        results = low_pass_loss(trainable_parameters(ctx.model), loss_fn, sigmas, int(s["draws"]),
                                int(s["seed"]), on_evaluation=ticker(bar), scalings=scalings)
    by_scaling = {scaling: [r for r in results if r.scaling == scaling] for scaling in scalings}
    main_index = sigmas.index(float(s["sigma"]))
    absolute = by_scaling["absolute"]
    arrays = {"sigma": absolute[main_index].sigma, "loss": absolute[main_index].loss,
              "sweep/sigma": np.array(sigmas), **scaling_arrays(absolute, main_index, prefix="")}
    for scaling in scalings:
        arrays.update(scaling_arrays(by_scaling[scaling], main_index, prefix=f"{scaling}/"))
    write_results(ctx, args, arrays, extra={
        "loss_terms": terms, "evaluation_set": evalset.describe(),
        "noise": NOISE["absolute"], "scalings": ",".join(scalings), "top_level_scaling": "absolute",
        **{f"noise_{scaling}": NOISE[scaling] for scaling in scalings},
    })


def checked_scalings(scalings) -> list[str]:
    """The configured scalings as a list, or a PipelineError naming what is wrong."""
    scalings = [scalings] if isinstance(scalings, str) else list(scalings)
    unknown = sorted(set(scalings) - set(SCALINGS))
    if unknown:
        raise PipelineError(f"metrics.lpf.scalings has unknown entries {unknown}; use some of {list(SCALINGS)}.")
    if len(set(scalings)) != len(scalings):
        raise PipelineError(f"metrics.lpf.scalings lists an entry twice: {scalings}; list each once.")
    if "absolute" not in scalings:
        raise PipelineError("metrics.lpf.scalings must include absolute: the file's top-level datasets and "
                            "the report's LPF table are the absolute LPF; add absolute to the list.")
    return scalings


def scaling_arrays(results: list[LPFResult], main_index: int, prefix: str) -> dict[str, np.ndarray | float]:
    """The scaling-dependent datasets of one scaling: at sigma (index `main_index`) and over the sweep.

    :param results: (S,) one LPFResult per sigma of the sweep, in sweep order.
    """
    main = results[main_index]
    return {
        f"{prefix}lpf": main.lpf, f"{prefix}difference": main.difference, f"{prefix}stderr": main.stderr,
        f"{prefix}draw_losses": main.draw_losses,
        f"{prefix}sweep/lpf": np.array([r.lpf for r in results]),
        f"{prefix}sweep/difference": np.array([r.difference for r in results]),
        f"{prefix}sweep/stderr": np.array([r.stderr for r in results]),
        f"{prefix}sweep/draw_losses": np.stack([r.draw_losses for r in results]),
    }
