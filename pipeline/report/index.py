"""results/report/index.md (and index.html): what the report holds and the open choices this run made.

An open choice is a setting the paper does not pin down (or an extension it does not have); each
item says what is left open and states this run's choice from what the inputs record (metric
files' settings and convention attributes, training logs, recipe descriptions), so the text
describes the numbers actually in the tables rather than the config of the day.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Mapping, Sequence

from pipeline import layout
from pipeline.io.provenance import git_revision, package_version
from pipeline.precision import CLIP, parse_precision, precision_scheme
from pipeline.report.collect import Collected
from pipeline.report.render import Table, html_grid, html_list, html_page, markdown_grid
from pipeline.report.study import Study
from pipeline.report.tables import Choices, exposure_steps, metric_note

FIGURE_CAPTIONS = {
    "fig1_loss_surface": "Fig. 1: 2-D loss surfaces of ADM and +SAM (and fSGLD), shared colour scale per dataset.",
    "fig2_samples_fp32_int8": "Figs. 2 and 4: samples of ADM, +SAM, +EMA, +SAM+EMA (and fSGLD) in fp32 and "
                              "quantized, at the smallest T'.",
    "fig5_loss_vs_perturbation": "Figs. 5, 7, 8: loss and loss increase against the norm of a random weight "
                                 "perturbation, every algorithm; shaded bands: ±1 std.",
    "fig6_eps_norm": "Figs. 6, 7, 8: mean L2 norm of the predicted noise eps_theta per timestep, training inputs "
                     "vs the sampling chain.",
}


def _recorded(data: Collected, metric: str, key: str) -> str:
    """The distinct recorded values of one convention, or a note that nothing recorded it."""
    values = data.conventions.get(metric, {}).get(key, [])
    if not values:
        return "not recorded"
    text = "; ".join(str(v) for v in values)
    return text if len(values) == 1 else f"differs between files: {text}"


def _setting(data: Collected, metric: str, key: str) -> str:
    blocks = data.conventions.get(metric, {}).get("settings", [])
    values = []
    for block in blocks:
        value = (block or {}).get(key, "not recorded")
        if value not in values:
            values.append(value)
    if not values:
        return "not recorded"
    text = ", ".join(str(v) for v in values)
    return text if len(values) == 1 else f"differs between files: {text}"


def _distinct(values: Sequence[Any]) -> str:
    unique = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return ", ".join(str(v) for v in unique)


def open_choices(study: Study, data: Collected, choices: Choices) -> list[str]:
    """The open choices as numbered Markdown items: what is open, then this run's choice."""
    items = []
    sentences = [f"{dataset}: {c.sentence()}" for dataset, by_label in choices.items() for c in by_label.values()]
    items.append("rho of +SAM (the paper gives only the grid {0.1, 0.01, 0.001}, not the rho behind its rows; "
                 "here it is chosen on samples of their own, never on the numbers the claims test): "
                 + ("; ".join(sentences) if sentences else "no SAM recipe in the study") + ".")

    train = data.train
    swa = _distinct([(s.get("swa") or {}) for s in train["settings"]])
    ema = _distinct([(s.get("ema") or {}).get("decay") for s in train["settings"]])
    constant = bool((train["lr_first"] == train["lr_last"]).all())
    items.append(f"SWA and EMA (the paper does not say whether the learning rate was cycled within SWA's "
                 f"cycles, nor fix the snapshot schedule): {_distinct(train['steps'].tolist())} training steps "
                 f"per run; SWA settings {swa} "
                 f"(snapshots per run: {_distinct(train['swa_snapshots'].tolist())}); "
                 f"EMA decay {ema}; the learning rate is "
                 + ("constant over each run (not cycled within SWA cycles)" if constant
                    else "not constant in every run (see train.h5 'lr')") + ".")

    if "lpf" in study.metrics:
        items.append(f"LPF (the paper states neither the noise std sigma, the number of weight-noise draws, the "
                     f"data behind the loss nor its terms): sigma {_setting(data, 'lpf', 'sigma')}, "
                     f"draws {_setting(data, 'lpf', 'draws')}, "
                     f"{_setting(data, 'lpf', 'n_eval')} fixed (x0, t, eps) evaluation triples, loss terms "
                     f"{_recorded(data, 'lpf', 'loss_terms')}; noise: {_recorded(data, 'lpf', 'noise')}; "
                     f"sigma sweep {_setting(data, 'lpf', 'sigma_sweep')}.")
    else:
        items.append("LPF: not measured (lpf not in study.metrics).")

    if "perturbation" in study.metrics:
        items.append(f"Loss under perturbation (the paper states neither the radii nor the number of random "
                     f"directions): radii {_setting(data, 'perturbation', 'radii')}, "
                     f"{_setting(data, 'perturbation', 'directions')} directions, "
                     f"{_setting(data, 'perturbation', 'n_eval')} evaluation triples, loss terms "
                     f"{_recorded(data, 'perturbation', 'loss_terms')}; directions: "
                     f"{_recorded(data, 'perturbation', 'directions_kind')}.")
    else:
        items.append("Loss under perturbation: not measured (perturbation not in study.metrics).")

    if "exposure" in study.metrics and data.exposure is not None:
        items.append(f"Exposure gap (the paper uses both the squared and the plain norm, and does not say how "
                     f"the per-timestep gap becomes one number): {_recorded(data, 'exposure', 'gap_convention')}. "
                     f"Table 1 shows the mean "
                     f"L2 (not squared) gap at T'={exposure_steps(data)}; "
                     f"{_setting(data, 'exposure', 'n_images')} images per curve. The paper's aggregation is "
                     f"not stated.")
    else:
        items.append("Exposure gap: not measured (exposure not in study.metrics).")

    quantized = []
    for precision in study.quantized_precisions:
        spec = parse_precision(precision) or {}
        if precision_scheme(spec) == CLIP:
            quantized.append(f"{precision} = {spec['bits']}-bit clip-and-round on the fixed range [-c, c] "
                             f"(c = quantization.clip, recorded in codes.h5), every tensor incl. 1-D, 0 a level")
            continue
        quantized.append(f"{precision} = {spec['bits']}-bit {spec['granularity'].replace('_', ' ')}, "
                         f"{'symmetric' if spec['symmetric'] else 'asymmetric'} min-max")
    items.append("Quantization (the paper clips and rounds the weights without saying per-tensor or "
                 "per-channel, symmetric or not, which tensors, or whether '+EMA' quantizes the EMA weights): "
                 + ("; ".join(quantized) if quantized else "no quantized precision")
                 + "; weight-only, simulated (dequantized for sampling); min-max quantizes tensors of >= 2 "
                   "dims, 1-D tensors (biases, GroupNorm) kept fp32 by the workflow's quantize rule; each average "
                   "(raw, EMA, SWA) is quantized on its own, so '+EMA int8' is the quantized EMA weights.")

    fsgld = []
    for recipe in study.fsgld_recipes:
        described = study.describe(recipe)
        f, opt = described["fsgld"], described["optimizer"]
        sigma = "coupled to beta_inv" if f.get("sigma") is None else f["sigma"]
        fsgld.append(f"{recipe} ({described['label']}): base {opt['name']} lr {opt['lr']}, beta_inv "
                     f"{f['beta_inv']}, eta {f['eta']}, sigma {sigma}, n_pert {f['n_pert']}")
    items.append("fSGLD (not in the paper; its source's own hyperparameters could not be read, and it has no "
                 "Adam form): " + ("; ".join(fsgld) if fsgld else "no fSGLD recipe in the study")
                 + ". The Adam base is this project's extension.")

    ips = [f"{r}: gamma {study.recipe(r).ip_gamma}" for r in study.recipes if study.recipe(r).ip_gamma]
    items.append("Input perturbation gamma (the paper says 0.1, DDPM-IP's CIFAR-10 command uses 0.15): "
                 + ("; ".join(ips) if ips else "no IP recipe in the study") + ".")

    if "hessian" in study.metrics and data.hessian is not None:
        unconverged = int((~data.hessian["converged"]).sum())
        items.append(f"Hessian (the paper does not name its Hessian tool; here power iteration for the top "
                     f"eigenvalue and Hutchinson's estimator for the trace, on one fixed batch): "
                     f"batch {_setting(data, 'hessian', 'batch')}, max_iter "
                     f"{_setting(data, 'hessian', 'max_iter')}, tol {_setting(data, 'hessian', 'tol')}; "
                     f"{unconverged} of {len(data.hessian)} estimates stopped at max_iter before converging.")
    if "surface" in study.metrics:
        items.append(f"Loss surface (grid and span are this run's; directions as Li et al. 2018): "
                     f"grid {_setting(data, 'surface', 'grid')} x {_setting(data, 'surface', 'grid')} "
                     f"over [-{_setting(data, 'surface', 'span')}, {_setting(data, 'surface', 'span')}]^2; "
                     f"{_recorded(data, 'surface', 'normalisation')}.")
    return [f"{i}. {item}" for i, item in enumerate(items, 1)]


# Below this many samples the Fréchet distance is far above its large-sample value and noisy.
FEW_SAMPLES = 10_000


def _small_sample_warning(n_samples: Sequence[int]) -> list[str]:
    if not n_samples or min(n_samples) >= FEW_SAMPLES:
        return []
    return [f"- Caution: {min(n_samples)} samples per model. With fewer than {FEW_SAMPLES:,} samples the "
            f"Fréchet distance is biased upward and noisy: compare models within this run only, never "
            f"with published values (the paper uses 50,000)."]


def evidence_banner(study: Study, data: Collected) -> str | None:
    """One line when the study is too small to be evidence (report.evidence), else None."""
    evidence = study.settings["report"]["evidence"]
    samples = int(data.fid["n_samples"].min())
    steps = int(data.train["steps"].min())
    short = []
    if samples < int(evidence["min_samples"]):
        short.append(f"{samples} samples per model (below {evidence['min_samples']})")
    if steps < int(evidence["min_training_steps"]):
        short.append(f"{steps} training steps (below {evidence['min_training_steps']})")
    if not short:
        return None
    return (f"> **A pipeline check, not evidence:** {' and '.join(short)}; the numbers show that every stage ran, "
            f"not what the methods do (thresholds: report.evidence).")


def _facts(study: Study, data: Collected) -> list[str]:
    """The study in a few plain-text lines: metric, datasets and recipes, seeds and variants."""
    fid = data.fid
    recipes = ", ".join(f"{r} ({study.label(r)})" for r in study.recipes)
    return [f"Metric: {metric_note(data.metric_name)} Extractor {study.extractor}, "
            f"{_distinct(fid['n_samples'].tolist())} samples per model.",
            f"Datasets: {', '.join(study.datasets)}; recipes: {recipes}.",
            f"Seeds: {', '.join(map(str, study.seeds))}; averages: {', '.join(study.averages)}; precisions: "
            f"{', '.join(study.precisions)}; T': {', '.join(map(str, study.steps))}; metrics: "
            f"{', '.join(study.metrics)}."]


def _control_warnings(tables: Sequence[Table]) -> list[str]:
    claims_table = next((t for t in tables if t.name == "claims"), None)
    return [n for n in (claims_table.notes if claims_table else []) if n.startswith("WARNING")]


def _generated_by() -> str:
    return (f"Generated by `python -m pipeline report` ({package_version()}, git {git_revision()}, "
            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}).")


def index_html(study: Study, data: Collected, choices: Choices, tables: Sequence[Table],
               figures: Mapping[str, str]) -> str:
    """index.md's content as one HTML page, for the Snakemake report (which shows .html inline).

    The figures are listed by caption only: the report shows each PNG as its own entry.
    """
    banner = evidence_banner(study, data)
    parts = ["<h1>Understanding Flatness in Generative Models: reproduction report</h1>"]
    if banner:
        # The banner's Markdown emphasis is dropped: the blockquote style marks it.
        parts.append(f"<blockquote>{html.escape(banner.removeprefix('> ').replace('**', ''))}</blockquote>")
    parts += [f"<blockquote>{html.escape(w)}</blockquote>" for w in _control_warnings(tables)]
    parts += [f"<p>{html.escape(_generated_by().replace('`', ''))}</p>",
              html_list(_facts(study, data) + [line.removeprefix("- ")
                                               for line in _small_sample_warning(data.fid["n_samples"].tolist())])]
    parts += ["<h2>Tables</h2>", html_list([f"{t.title} ({t.name}.html, .csv, .md, .tex)" for t in tables])]
    parts += ["<h2>Figures</h2>", html_list([f"{caption} ({name}.png, .pdf)" for name, caption in figures.items()])]
    parts += ["<h2>Choices the paper leaves open, as this run made them</h2>",
              "<p>Each item names what the paper leaves open, then the setting this run used, read from its "
              "files.</p>",
              html_list([item.split(". ", 1)[1] for item in open_choices(study, data, choices)], ordered=True)]
    claims = next((t for t in tables if t.name == "claims"), None)
    if claims is not None:
        parts += ["<h2>Claims</h2>", html_grid(claims.frame), html_list(claims.notes)]
    parts.append(f"<p>Inputs: FID files, metric files and training logs under {html.escape(study.results)}/; "
                 f"outputs: {html.escape(layout.report_dir(study.results))}/.</p>")
    return html_page("Reproduction report", "\n".join(parts))


def index_markdown(study: Study, data: Collected, choices: Choices, tables: Sequence[Table],
                   figures: Mapping[str, str]) -> str:
    """The whole index.md text."""
    fid = data.fid
    banner = evidence_banner(study, data)
    warnings = _control_warnings(tables)
    lines = [
        "# Understanding Flatness in Generative Models: reproduction report",
        "",
        *([banner, ""] if banner else []),
        *[line for w in warnings for line in (f"> **{w}**", "")],
        _generated_by(),
        "",
        *[f"- {fact}" for fact in _facts(study, data)],
        *_small_sample_warning(fid["n_samples"].tolist()),
        "",
        "## Tables",
        "",
    ]
    for table in tables:
        files = ", ".join(f"[{ext}]({table.name}.{ext})" for ext in ("csv", "md", "tex"))
        lines.append(f"- **{table.title}** ({files})")
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        lines += [f"- **{caption}** ([PDF]({name}.pdf))", "", f"  ![{name}]({name}.png)", ""]
    lines += ["## Choices the paper leaves open, as this run made them", "",
              "Each item names what the paper leaves open, then the setting this run used, read from its files.", "",
              *open_choices(study, data, choices), ""]
    claims = next((t for t in tables if t.name == "claims"), None)
    if claims is not None:
        lines += ["## Claims", "", markdown_grid(claims.frame), "", *[f"- {n}" for n in claims.notes], ""]
    lines += [f"Inputs: FID files, metric files and training logs under {study.results}/ "
              f"(paths: pipeline/layout.py); outputs: {layout.report_dir(study.results)}/."]
    return "\n".join(lines) + "\n"
