"""The index's fixed prose as templates: index.py fills the {fields} from the run's files.

Each open choice reads "what the paper leaves open (in parentheses): this run's choice". A
template with a `missing` twin is used when its metric (or recipe kind) is not in the study.
"""

from __future__ import annotations

TITLE = "Understanding Flatness in Generative Models: reproduction report"

OPEN_CHOICES_INTRO = ("Each item names what the paper leaves open, then the setting this run used, read from its "
                      "files.")

# key -> (template, text when not measured or not in the study; None: the item is left out).
OPEN_CHOICES = {
    "rho": ("rho of +SAM (the paper gives only the grid {{0.1, 0.01, 0.001}}, not the rho behind its rows; here it "
            "is chosen on samples of their own, never on the numbers the claims test): {sentences}.",
            "rho of +SAM (the paper gives only the grid {0.1, 0.01, 0.001}, not the rho behind its rows): no SAM "
            "recipe in the study."),
    "averages": ("SWA and EMA (the paper does not say whether the learning rate was cycled within SWA's cycles, "
                 "nor fix the snapshot schedule): {steps} training steps per run; SWA settings {swa} (snapshots "
                 "per run: {snapshots}); EMA decay {ema}; the learning rate is {lr}.", None),
    "lpf": ("LPF (the paper states neither the noise std sigma, the number of weight-noise draws, the data behind "
            "the loss nor its terms): sigma {sigma}, draws {draws}, {n_eval} fixed (x0, t, eps) evaluation "
            "triples, loss terms {loss_terms}; noise: {noise}; sigma sweep {sigma_sweep}.",
            "LPF: not measured (lpf not in study.metrics)."),
    "perturbation": ("Loss under perturbation (the paper states neither the radii nor the number of random "
                     "directions): radii {radii}, {directions} directions, {n_eval} evaluation triples, loss terms "
                     "{loss_terms}; directions: {directions_kind}.",
                     "Loss under perturbation: not measured (perturbation not in study.metrics)."),
    "exposure": ("Exposure gap (the paper uses both the squared and the plain norm, and does not say how the "
                 "per-timestep gap becomes one number): {gap_convention}. Table 1 shows the mean L2 (not squared) "
                 "gap at T'={steps}; {n_images} images per curve. The paper's aggregation is not stated.",
                 "Exposure gap: not measured (exposure not in study.metrics)."),
    "quantization": ("Quantization (the paper clips and rounds the weights without saying per-tensor or "
                     "per-channel, symmetric or not, which tensors, or whether '+EMA' quantizes the EMA weights): "
                     "{schemes}; weight-only, simulated (dequantized for sampling); min-max quantizes tensors of "
                     ">= 2 dims, 1-D tensors (biases, GroupNorm) kept fp32 by the workflow's quantize rule; each "
                     "average (raw, EMA, SWA) is quantized on its own, so '+EMA int8' is the quantized EMA weights.",
                     None),
    "fsgld": ("fSGLD (not in the paper; its source's own hyperparameters could not be read, and it has no Adam "
              "form): {recipes}. The Adam base is this project's extension.", None),
    "ip": ("Input perturbation gamma (the paper says 0.1, DDPM-IP's CIFAR-10 command uses 0.15): {recipes}.", None),
    "hessian": ("Hessian (the paper does not name its Hessian tool; here power iteration for the top eigenvalue "
                "and Hutchinson's estimator for the trace, on one fixed batch): batch {batch}, max_iter {max_iter}, "
                "tol {tol}; of {count} estimates each, {eigenvalue} top eigenvalue(s) and {trace} trace(s) stopped "
                "at max_iter before converging.", None),
    "surface": ("Loss surface (grid and span are this run's; directions as Li et al. 2018): grid {grid} x {grid} "
                "over [-{span}, {span}]^2; {normalisation}.", None),
}

CLIP_SCHEME = ("{precision} = {bits}-bit clip-and-round on the fixed range [-c, c] (c = quantization.clip, recorded "
               "in codes.h5), every tensor incl. 1-D, 0 a level")
MINMAX_SCHEME = "{precision} = {bits}-bit {granularity}, {symmetry} min-max"
FSGLD_RECIPE = ("{recipe} ({label}): base {optimizer} lr {lr}, beta_inv {beta_inv}, eta {eta}, sigma {sigma}, "
                "n_pert {n_pert}")
LR_CONSTANT = "constant over each run (not cycled within SWA cycles)"
LR_VARYING = "not constant in every run (see train.h5 'lr')"

SMALL_SAMPLES = ("Caution: {n} samples per model. With fewer than {few:,} samples the Fréchet distance is biased "
                 "upward and noisy: compare models within this run only, never with published values (the paper "
                 "uses 50,000).")
EVIDENCE = ("A pipeline check, not evidence: {short}; the numbers show that every stage ran, not what the methods "
            "do (thresholds: report.evidence).")

ANSWERS_INTRO = ("One line per claim of the paper (and the controls): its verdicts over the rows of the claims "
                 "table, each row's effect with its interval, and the number of training seeds behind it. "
                 "held: the interval lies on the claimed side (or within the margin, for 'does not' claims); "
                 "not held: on the other side; inconclusive: neither.")
CLAIMS_INTRO = ("Every row: one claim, dataset, algorithm and measure; the effect with its interval, how the "
                "interval was made, the rule (stated once below, by kind; m is the row's margin) and the verdict.")
