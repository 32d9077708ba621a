"""Hessian of the training loss: top eigenvalue (power iteration) and trace (Hutchinson).

Both from Hessian-vector products by double back-propagation on one fixed batch: the first
`batch` triples of the seeded evaluation set (the same for every model). Power iteration stops
when the eigenvalue estimate changes by less than `tol` (relative), Hutchinson (Rademacher
probes) when the running mean does; each takes at most `max_iter` products. Attention runs on the
twice-differentiable "math" path; model in eval mode, float32. The loss value is the training
loss (terms recorded), differentiated without the training objective's stop-gradient on the VB
term, so this is the Hessian of the same function the other measures evaluate.

Cost: one gradient with graph plus up to 2 * max_iter Hessian-vector products over `batch`
images; each product is a backward pass through the gradient graph (a few forward+backward
passes' worth); linear in batch and max_iter. With batch_size >= batch the graph is built once
and kept in memory; with batch_size < batch every product rebuilds it chunk by chunk (memory of
one chunk, more time).
"""

from __future__ import annotations

import argparse

from pipeline.arguments import positive_float, positive_int
from pipeline.errors import PipelineError
from pipeline.flatness.evalset import effective_terms, evaluation_loss, load_evaluation_set, loss_chunks
from pipeline.flatness.hessian import HessianOperator, hutchinson_trace, top_eigenvalue, twice_differentiable
from pipeline.flatness.model_setup import build_diffusion
from pipeline.flatness.weights import trainable_parameters
from pipeline.stages.metric_common import SUPPRESS, add_common_arguments, prepare, write_results

NAME = "hessian"
DEFAULTS = {"batch": 256, "max_iter": 100, "tol": 1e-3, "seed": 0, "batch_size": 256, "terms": "mse+vb"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, NAME)
    parser.add_argument("--batch", type=positive_int, default=SUPPRESS,
                        help="fixed (x0, t, eps) triples the Hessian is taken over (built-in 256); "
                             "--batch-size splits them into chunks for memory")
    parser.add_argument("--max-iter", dest="max_iter", type=positive_int, default=SUPPRESS,
                        help="most products for each estimate (built-in 100)")
    parser.add_argument("--tol", type=positive_float, default=SUPPRESS,
                        help="relative change that ends either estimate (built-in 1e-3)")


def run(args: argparse.Namespace) -> None:
    ctx = prepare(args, NAME, DEFAULTS)
    s = ctx.settings
    if int(s["batch"]) < 1 or int(s["max_iter"]) < 1 or float(s["tol"]) < 0:
        raise PipelineError("batch and max_iter must be >= 1 and tol >= 0.")
    diffusion = build_diffusion(ctx.model_settings)
    terms = effective_terms(diffusion, s["terms"])
    batch = load_evaluation_set(ctx.data_path, int(s["batch"]), int(s["seed"]), diffusion.num_timesteps)
    params = trainable_parameters(ctx.model)
    loss = evaluation_loss(ctx.model, diffusion, batch, int(s["batch_size"]), terms)

    ctx.model.eval()
    with twice_differentiable(ctx.model):
        chunks = loss_chunks(ctx.model, diffusion, batch, min(int(s["batch_size"]), len(batch)), terms)
        hvp = HessianOperator(params, chunks)
        with ctx.bar(int(s["max_iter"]), "power iteration", unit="iterations") as bar:
            eigen = top_eigenvalue(_counting(hvp, bar), params, int(s["seed"]), int(s["max_iter"]), float(s["tol"]))
        with ctx.bar(int(s["max_iter"]), "Hutchinson probes", unit="iterations") as bar:
            trace = hutchinson_trace(_counting(hvp, bar), params, int(s["seed"]), int(s["max_iter"]), float(s["tol"]))
        products = hvp.products
        del hvp
    write_results(ctx, args, {
        "loss": loss,
        "top_eigenvalue": eigen.eigenvalue, "eigenvalue_iterations": eigen.iterations,
        "eigenvalue_converged": eigen.converged, "eigenvalue_history": eigen.history,
        "trace": trace.trace, "trace_stderr": trace.stderr, "trace_samples": trace.samples,
        "trace_converged": trace.converged, "hessian_vector_products": products,
    }, extra={
        "loss_terms": terms, "evaluation_set": batch.describe(),
        "eigenvalue_method": "power iteration, largest |lambda|, stop at relative change < tol",
        "trace_method": "Hutchinson, Rademacher probes, stop at relative change of the running mean < tol",
        "loss_gradient": "true gradient of the loss value (no stop-gradient on the VB term)",
    })


def _counting(hvp: HessianOperator, bar):
    def product(vector):
        result = hvp(vector)
        bar.update(1)
        return result
    return product
