"""`snakemake --report`: the HTML report carries the study, not only download links.

Builds the report of the micro workflow (the session's shared run, tests/conftest.py) and reads
what it embeds: the workflow description, the captions, the claims table and index as HTML, the
labelled sample grids, and no PDF or LaTeX duplicates.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import MICRO_OVERLAYS, run_snakemake


@pytest.fixture(scope="module")
def report_html(micro_workdir) -> str:
    """The report of the micro workflow (the session's shared run; building it changes no output)."""
    run_snakemake(micro_workdir, "--report", "report.html", *MICRO_OVERLAYS)
    if os.environ.get("KEEP_HTML_REPORT"):  # for looking at it in a browser
        shutil.copy2(micro_workdir / "report.html", os.environ["KEEP_HTML_REPORT"])
    return (micro_workdir / "report.html").read_text(encoding="utf-8")


def embedded_results(page: str) -> dict[str, dict]:
    """The report's results: path -> entry (mime type, caption HTML, labels, data URI)."""
    match = re.search(r"var results = (\{.*?\});\n", page)
    assert match, "the report embeds no results"
    return json.loads(match.group(1))


def decoded(entry: dict) -> str:
    head, _, payload = entry["data_uri"].partition(",")
    assert head.endswith(";base64"), head
    return base64.b64decode(payload).decode("utf-8")


def test_report_shows_the_claims_and_index_as_html(report_html) -> None:
    results = embedded_results(report_html)
    claims = next(entry for path, entry in results.items() if path.endswith("report/claims.html"))
    assert claims["mime_type"] == "text/html"
    text = decoded(claims)
    assert "<table>" in text and "+SAM is flatter than ADM" in text and "inconclusive" in text
    index = decoded(next(entry for path, entry in results.items() if path.endswith("report/index.html")))
    assert "Choices the paper leaves open" in index and "SPEC" not in index


def test_every_figure_and_table_has_its_caption(report_html) -> None:
    results = embedded_results(report_html)
    fig6 = next(entry for path, entry in results.items() if path.endswith("fig6_eps_norm.html"))
    assert "the sampling chain runs left to right" in fig6["caption"]
    # The figure's own page shows its caption under the image, not only behind the info button.
    page = decoded(fig6)
    assert "data:image/png;base64," in page and "<figcaption>" in page and "Figs. 6, 7, 8" in page
    assert fig6["labels"]["title"] and not any(path.endswith("fig6_eps_norm.png") for path in results)
    for path, entry in results.items():
        assert entry["caption"].strip(), f"{path} has no caption"


def test_no_pdf_or_latex_duplicates_and_every_sample_grid_labelled(report_html) -> None:
    results = embedded_results(report_html)
    suffixes = {Path(path).suffix for path in results}
    assert suffixes == {".html", ".png"}, suffixes
    grids = {path: entry for path, entry in results.items() if path.endswith("grid.png")}
    # micro-complete: adm and sam_rho0.1, raw and EMA weights, fp32 and int8, T' = 20; and the
    # negative control's raw fp32 grid.
    assert len(grids) == 9, sorted(grids)
    for entry in grids.values():
        assert entry["labels"]["precision"] in {"fp32", "int8"} and entry["labels"]["T'"] == "20"
    assert {entry["labels"]["recipe"] for entry in grids.values()} == {"adm", "sam_rho0.1"}


def test_workflow_description_states_the_study_and_its_caveats(report_html) -> None:
    assert "never decided" in report_html and "sample_validation" in report_html
