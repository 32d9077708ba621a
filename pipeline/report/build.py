"""Assemble the report: collect inputs, pick the SAM rho, write tables, figures and index.md/.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.report.claims import claims_table
from pipeline.report.collect import MAKER, collect
from pipeline.report.figures import FIGURE_BUILDERS, save_figure, samples_needed
from pipeline.report.index import FIGURE_CAPTIONS, claims_html, figures_html, index_html, index_markdown, png_source
from pipeline.report.render import html_page
from pipeline.report.power import power_table
from pipeline.report.render import write_table
from pipeline.report.study import Study, select_sam
from pipeline.report.tables import TABLE_BUILDERS


def build_report(settings: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the whole report into `out_dir`; returns the paths written.

    :param settings: `stage_settings(config, "report")`, as the Snakemake rule passes it.
    Every input is checked before the first output is written, so a missing file leaves the
    previous report untouched.
    """
    out_dir = Path(out_dir)
    study = Study(dict(settings))
    data = collect(study)
    choices = select_sam(study, data.validation, data.metric_name)
    missing = [path for path in samples_needed(study, choices) if not Path(path).is_file()]
    if missing:
        shown = "\n".join(f"  - {path}  <- {MAKER['sample']}" for path in missing[:12])
        raise PipelineError(f"Fig. 2 needs {len(missing)} samples file(s) that do not exist:\n{shown}")

    tables = [builder(study, data, choices) for builder in TABLE_BUILDERS]
    tables += [claims_table(study, data, choices), power_table(study, data, choices)]
    by_name = {table.name: table for table in tables}
    written: list[Path] = []
    for name in layout.REPORT_TABLES:
        # The claims page states each rule once above the table, as index.html does, so it fits 1,280 px.
        written += write_table(by_name[name], out_dir, claims_html(by_name[name]) if name == "claims" else None)
    for name in layout.REPORT_FIGURES:
        written += save_figure(FIGURE_BUILDERS[name](study, data, choices), out_dir, name)

    ordered = [by_name[n] for n in layout.REPORT_TABLES]
    captions = {name: FIGURE_CAPTIONS[name] for name in layout.REPORT_FIGURES}
    sources = {name: png_source(out_dir / f"{name}.png") for name in layout.REPORT_FIGURES}
    pages = {out_dir / "index.md": index_markdown(study, data, choices, ordered, captions),
             out_dir / "index.html": index_html(study, data, choices, ordered, captions, sources)}
    # One page per figure with its caption under it: what Snakemake's HTML report shows for a figure.
    pages.update({out_dir / f"{name}.html": html_page(captions[name].split(":")[0],
                                                      figures_html({name: captions[name]}, sources))
                  for name in layout.REPORT_FIGURES})
    for index, text in pages.items():
        with atomic_path(index) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(index)
    return written
