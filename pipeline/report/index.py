"""results/report/index.html (and index.md): the report on one page, answers first.

The page opens with the answers (one line per claim, counted over the claims table), then the
claims table with its rules stated once by kind, every table inline, every figure with its
caption, and the open choices.

An open choice is a setting the paper does not pin down (or an extension it does not have); each
item says what is left open and states this run's choice from what the inputs record (metric
files' settings and convention attributes, training logs, recipe descriptions), so the text
describes the numbers actually in the tables rather than the config of the day.
"""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline import layout
from pipeline.io.provenance import git_revision, package_version
from pipeline.precision import CLIP, parse_precision, precision_scheme
from pipeline.report import prose
from pipeline.report.answers import VERDICTS, answers, rule_kinds, verdict_counts
from pipeline.report.claims import NOT_APPLICABLE
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
    "training_curves": "Training curves (not in the paper): loss, mse, vb and gradient norm per step for every "
                       "run and seed, smoothed; dashed grey: the negative control's runs. mse and vb are plain "
                       "means over the sampled timesteps: they step up when the loss-second-moment sampler, "
                       "once every timestep has 10 recorded losses, starts drawing the high-loss timesteps more "
                       "often; loss is importance-weighted and stays comparable across that point.",
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


def _rho_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str] | None:
    sentences = [f"{dataset}: {c.sentence()}" for dataset, by_label in choices.items() for c in by_label.values()]
    return {"sentences": "; ".join(sentences)} if sentences else None


def _average_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str]:
    train = data.train
    constant = bool((train["lr_first"] == train["lr_last"]).all())
    return {"steps": _distinct(train["steps"].tolist()),
            "swa": _distinct([(s.get("swa") or {}) for s in train["settings"]]),
            "snapshots": _distinct(train["swa_snapshots"].tolist()),
            "ema": _distinct([(s.get("ema") or {}).get("decay") for s in train["settings"]]),
            "lr": prose.LR_CONSTANT if constant else prose.LR_VARYING}


def _metric_fields(metric: str, settings: Sequence[str], recorded: Sequence[str]):
    """Fields of a metric's item: its settings block's keys and its files' convention attributes."""
    def fields(study: Study, data: Collected, choices: Choices) -> dict[str, str] | None:
        if metric not in study.metrics:
            return None
        return {**{key: _setting(data, metric, key) for key in settings},
                **{key: _recorded(data, metric, key) for key in recorded}}
    return fields


def _exposure_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str] | None:
    if "exposure" not in study.metrics or data.exposure is None:
        return None
    return {"gap_convention": _recorded(data, "exposure", "gap_convention"), "steps": str(exposure_steps(data)),
            "n_images": _setting(data, "exposure", "n_images")}


def _quantization_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str]:
    schemes = []
    for precision in study.quantized_precisions:
        spec = parse_precision(precision) or {}
        if precision_scheme(spec) == CLIP:
            schemes.append(prose.CLIP_SCHEME.format(precision=precision, bits=spec["bits"]))
            continue
        schemes.append(prose.MINMAX_SCHEME.format(
            precision=precision, bits=spec["bits"], granularity=spec["granularity"].replace("_", " "),
            symmetry="symmetric" if spec["symmetric"] else "asymmetric"))
    return {"schemes": "; ".join(schemes) if schemes else "no quantized precision"}


def _fsgld_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str]:
    recipes = []
    for recipe in study.fsgld_recipes:
        described = study.describe(recipe)
        f, opt = described["fsgld"], described["optimizer"]
        recipes.append(prose.FSGLD_RECIPE.format(
            recipe=recipe, label=described["label"], optimizer=opt["name"], lr=opt["lr"], beta_inv=f["beta_inv"],
            eta=f["eta"], sigma="coupled to beta_inv" if f.get("sigma") is None else f["sigma"], n_pert=f["n_pert"]))
    return {"recipes": "; ".join(recipes) if recipes else "no fSGLD recipe in the study"}


def _ip_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str]:
    ips = [f"{r}: gamma {study.recipe(r).ip_gamma}" for r in study.recipes if study.recipe(r).ip_gamma]
    return {"recipes": "; ".join(ips) if ips else "no IP recipe in the study"}


def _hessian_fields(study: Study, data: Collected, choices: Choices) -> dict[str, str] | None:
    if "hessian" not in study.metrics or data.hessian is None:
        return None
    unconverged = {k: str(int((~data.hessian[f"{k}_converged"]).sum())) for k in ("eigenvalue", "trace")}
    return {**{key: _setting(data, "hessian", key) for key in ("batch", "max_iter", "tol")},
            "count": str(len(data.hessian)), **unconverged}


# The fields of each prose.OPEN_CHOICES item; None: use the item's `missing` text (or leave it out).
CHOICE_FIELDS = {
    "rho": _rho_fields,
    "averages": _average_fields,
    "lpf": _metric_fields("lpf", ("sigma", "draws", "n_eval", "sigma_sweep"), ("loss_terms", "noise")),
    "perturbation": _metric_fields("perturbation", ("radii", "directions", "n_eval"),
                                   ("loss_terms", "directions_kind")),
    "exposure": _exposure_fields,
    "quantization": _quantization_fields,
    "fsgld": _fsgld_fields,
    "ip": _ip_fields,
    "hessian": _hessian_fields,
    "surface": _metric_fields("surface", ("grid", "span"), ("normalisation",)),
}


def open_choices(study: Study, data: Collected, choices: Choices) -> list[str]:
    """The open choices as numbered Markdown items: what is open, then this run's choice."""
    items = []
    for key, (template, missing) in prose.OPEN_CHOICES.items():
        fields = CHOICE_FIELDS[key](study, data, choices)
        if fields is not None:
            items.append(template.format(**fields))
        elif missing is not None:
            items.append(missing)
    return [f"{i}. {item}" for i, item in enumerate(items, 1)]


# Below this many samples the Fréchet distance is far above its large-sample value and noisy.
FEW_SAMPLES = 10_000


def _small_sample_warning(n_samples: Sequence[int]) -> list[str]:
    if not n_samples or min(n_samples) >= FEW_SAMPLES:
        return []
    return ["- " + prose.SMALL_SAMPLES.format(n=min(n_samples), few=FEW_SAMPLES)]


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
    head, _, rest = prose.EVIDENCE.format(short=" and ".join(short)).partition(": ")
    return f"> **{head}:** {rest}"


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


def _claims(tables: Sequence[Table]) -> Table | None:
    return next((t for t in tables if t.name == "claims"), None)


def _control_warnings(tables: Sequence[Table]) -> list[str]:
    claims = _claims(tables)
    return [n for n in (claims.notes if claims else []) if n.startswith("WARNING")]


def _generated_by() -> str:
    return (f"Generated by `python -m pipeline report` ({package_version()}, git {git_revision()}, "
            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}).")


def count_line(frame: pd.DataFrame) -> str:
    """"held 6, not held 9, inconclusive 27 (of 42 rows; 2 n.a.)": the claims table's verdicts."""
    counts = verdict_counts(frame)
    text = ", ".join(f"{verdict} {counts[verdict]}" for verdict in VERDICTS)
    skipped = f"; {counts[NOT_APPLICABLE]} {NOT_APPLICABLE}" if counts[NOT_APPLICABLE] else ""
    return f"{text} (of {len(frame)} rows{skipped})"


# ------------------------------------------------------------------------------------------
# index.html: the whole report on one page.

# The claims columns in reading order for the page (the CSV keeps the table's own order).
CLAIMS_ORDER = ["id", "verdict", "effect [CI]", "seeds", "claim", "algorithm", "measure", "dataset", "condition", "interval",
                "rule"]


def _anchor(section: str, title: str, body: str) -> str:
    return f'<section id="{section}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def answers_html(study: Study, claims: Table) -> str:
    """The Answers section's body: the counts, then one row per claim."""
    rows = [f"<tr><td class=\"text\">{html.escape(a.claim_id)}</td><td class=\"text\">{html.escape(a.claim)}</td>"
            f"<td class=\"text\">{html.escape(a.verdicts())}</td><td class=\"text\">"
            + "<br>".join(html.escape(e) for e in a.effects)
            + f"</td><td class=\"number\">{a.seeds}</td></tr>" for a in answers(study, claims.frame)]
    header = "".join(f"<th>{h}</th>" for h in ("id", "claim", "verdicts", "effect [CI] per row", "seeds"))
    return (f'<p class="counts"><strong>{html.escape(count_line(claims.frame))}</strong></p>\n'
            f"<p>{html.escape(prose.ANSWERS_INTRO)}</p>\n"
            f'<div class="wide"><table class="answers">\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody>\n</table></div>")


def claims_html(claims: Table) -> str:
    """The claims table with its rules stated once per kind above it, and its notes below."""
    kinds, labels = rule_kinds(claims.frame)
    frame = claims.frame.assign(rule=labels)[CLAIMS_ORDER]
    rules = html_list([f"R{i}: {kind}" for i, kind in enumerate(kinds, 1)])
    return (f"<p>{html.escape(prose.CLAIMS_INTRO)}</p>\n{rules}\n"
            f'<div class="wide">{html_grid(frame)}</div>\n{html_list(claims.notes)}')


def _downloads(name: str, extensions: Sequence[str]) -> str:
    return " · ".join(f'<a href="{name}.{ext}">{ext}</a>' for ext in extensions)


def tables_html(tables: Sequence[Table]) -> str:
    parts = []
    for table in tables:
        if table.name == "claims":
            continue
        parts += [f'<h3 id="{table.name}">{html.escape(table.title)}</h3>',
                  f"<p>{_downloads(table.name, ('csv', 'md', 'tex', 'html'))}</p>",
                  f'<div class="wide">{html_grid(table.frame)}</div>', html_list(table.notes)]
    return "\n".join(parts)


def png_source(path: Path) -> str:
    """A PNG as a data URI: the page then shows its figures wherever it is opened, the Snakemake report's
    frame included."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures_html(figures: Mapping[str, str], sources: Mapping[str, str]) -> str:
    return "\n".join(f'<figure id="{name}">\n<img src="{sources.get(name, name + ".png")}" '
                     f'alt="{html.escape(caption)}">\n'
                     f"<figcaption>{html.escape(caption)} ({_downloads(name, ('png', 'pdf'))})</figcaption>\n</figure>"
                     for name, caption in figures.items())


def contents_html(sections: Sequence[tuple[str, str]], tables: Sequence[Table], figures: Mapping[str, str]) -> str:
    """The table of contents: every section, with each table and figure under its own."""
    children = {"tables": [(t.name, t.title) for t in tables if t.name != "claims"],
                "figures": [(name, caption.split(":")[0]) for name, caption in figures.items()]}
    items = []
    for section, title in sections:
        sub = "".join(f'<li><a href="#{k}">{html.escape(v)}</a></li>' for k, v in children.get(section, []))
        items.append(f'<li><a href="#{section}">{html.escape(title)}</a>' + (f"<ol>{sub}</ol>" if sub else "")
                     + "</li>")
    return '<nav id="contents">\n<h2>Contents</h2>\n<ol>\n' + "\n".join(items) + "\n</ol>\n</nav>"


def index_html(study: Study, data: Collected, choices: Choices, tables: Sequence[Table],
               figures: Mapping[str, str], sources: Mapping[str, str] | None = None) -> str:
    """The report as one page: answers, claims, every table inline, every figure with its caption, open choices.

    :param sources: figure name -> image source (png_source's data URI); a figure not in it is linked
        as name.png beside the page.
    """
    claims = _claims(tables)
    banner = evidence_banner(study, data)
    head = ["<h1>" + html.escape(prose.TITLE) + "</h1>"]
    if banner:
        # The banner's Markdown emphasis is dropped: the blockquote style marks it.
        head.append(f"<blockquote>{html.escape(banner.removeprefix('> ').replace('**', ''))}</blockquote>")
    head += [f"<blockquote>{html.escape(w)}</blockquote>" for w in _control_warnings(tables)]
    head += [f"<p>{html.escape(_generated_by().replace('`', ''))}</p>",
             html_list(_facts(study, data) + [line.removeprefix("- ")
                                              for line in _small_sample_warning(data.fid["n_samples"].tolist())])]
    sections = []
    if claims is not None:
        sections += [("answers", "Answers", answers_html(study, claims)), ("claims", "Claims", claims_html(claims))]
    sections += [("tables", "Tables", tables_html(tables)), ("figures", "Figures", figures_html(figures, sources or {})),
                 ("choices", "Choices the paper leaves open, as this run made them",
                  f"<p>{html.escape(prose.OPEN_CHOICES_INTRO)}</p>\n"
                  + html_list([item.split(". ", 1)[1] for item in open_choices(study, data, choices)], ordered=True))]
    inputs = (f"<p>Inputs: FID files, metric files and training logs under {html.escape(study.results)}/; "
              f"outputs: {html.escape(layout.report_dir(study.results))}/.</p>")
    body = [*head, contents_html([(key, title) for key, title, _ in sections], tables, figures),
            *[_anchor(key, title, text) for key, title, text in sections], inputs]
    return html_page("Reproduction report", "\n".join(body))


# ------------------------------------------------------------------------------------------
# index.md: the same content for a Markdown viewer.

def answers_markdown(study: Study, claims: Table) -> list[str]:
    lines = ["## Answers", "", f"**{count_line(claims.frame)}**", "", prose.ANSWERS_INTRO, ""]
    for a in answers(study, claims.frame):
        seeds = f" ({a.seeds} seed{'s' * (a.seeds != '1')})" if a.seeds else ""
        lines.append(f"- **{a.claim_id}** {a.claim}: {a.verdicts()}{seeds}; "
                     + "; ".join(a.effects))
    return lines + [""]


def index_markdown(study: Study, data: Collected, choices: Choices, tables: Sequence[Table],
                   figures: Mapping[str, str]) -> str:
    """The whole index.md text."""
    fid = data.fid
    banner = evidence_banner(study, data)
    claims = _claims(tables)
    lines = [f"# {prose.TITLE}", "", *([banner, ""] if banner else []),
             *[line for w in _control_warnings(tables) for line in (f"> **{w}**", "")],
             _generated_by(), "", *[f"- {fact}" for fact in _facts(study, data)],
             *_small_sample_warning(fid["n_samples"].tolist()), ""]
    if claims is not None:
        lines += answers_markdown(study, claims)
    lines += ["## Tables", ""]
    for table in tables:
        files = ", ".join(f"[{ext}]({table.name}.{ext})" for ext in ("csv", "md", "tex"))
        lines.append(f"- **{table.title}** ({files})")
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        lines += [f"- **{caption}** ([PDF]({name}.pdf))", "", f"  ![{name}]({name}.png)", ""]
    lines += ["## Choices the paper leaves open, as this run made them", "", prose.OPEN_CHOICES_INTRO, "",
              *open_choices(study, data, choices), ""]
    if claims is not None:
        lines += ["## Claims", "", markdown_grid(claims.frame), "", *[f"- {n}" for n in claims.notes], ""]
    lines += [f"Inputs: FID files, metric files and training logs under {study.results}/ "
              f"(paths: pipeline/layout.py); outputs: {layout.report_dir(study.results)}/."]
    return "\n".join(lines) + "\n"
