"""index.html is the report: every table and figure on the page, answers first, counts that match the claims.

Parses the page of the three-seed synthetic study (tests/test_report.py's fixture, with negative
control runs) with the standard library's HTML parser: no string search for markup.
"""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pandas as pd
import pytest

from pipeline import layout
from pipeline.report import build_report
from pipeline.report.answers import rule_kinds
from test_report import make_study  # the synthetic study of the report tests


class Page(HTMLParser):
    """What the checks need: ids, links, images with their captions, the text of every section by id."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.captions: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self.tables_in: dict[str, int] = {}
        self._section: str | None = None
        self._caption: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figcaption":
            self._caption = []
        if tag == "table" and self._section:
            self.tables_in[self._section] = self.tables_in.get(self._section, 0) + 1

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if tag == "figcaption":
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        if self._section:
            self.sections[self._section].append(data)
        if self._caption is not None:
            self._caption.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_index")
    settings = make_study(root, seeds=(0, 1, 2), control_seeds=(100, 101, 102))
    out = root / "results" / "report"
    build_report(settings, out)
    page = Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    return out, page


def test_every_table_and_figure_is_on_the_page(report) -> None:
    out, page = report
    for name in layout.REPORT_TABLES:
        # Each table inline under its own anchor (claims: its section) and linked as files.
        assert name in page.ids or name == "claims", name
        assert f"#{name}" in page.links or name == "claims", name
        assert f"{name}.csv" in page.links or name == "claims", name
    assert page.tables_in["tables"] == len(layout.REPORT_TABLES) - 1
    assert page.tables_in["claims"] == 1 and page.tables_in["answers"] == 1
    for name in layout.REPORT_FIGURES:
        assert f"{name}.png" in page.links and f"{name}.pdf" in page.links and f"#{name}" in page.links
        assert (out / f"{name}.png").is_file()
    assert len(page.captions) == len(layout.REPORT_FIGURES) and all(len(c) > 40 for c in page.captions)
    # Each figure inline as its own PNG, so the page shows it wherever it is opened.
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.images] == [
        (out / f"{name}.png").read_bytes() for name in layout.REPORT_FIGURES]
    # The sections in reading order, each in the table of contents.
    order = [i for i in page.ids if i in ("contents", "answers", "claims", "tables", "figures", "choices")]
    assert order == ["contents", "answers", "claims", "tables", "figures", "choices"]
    assert all(f"#{s}" in page.links for s in order[1:])


def test_answers_count_the_claims_table(report) -> None:
    out, page = report
    claims = pd.read_csv(out / "claims.csv", dtype=str, keep_default_na=False)
    text = " ".join(page.sections["answers"])
    counts = re.search(r"held (\d+), not held (\d+), inconclusive (\d+) \(of (\d+) rows", text)
    assert counts, text[:300]
    expected = [int((claims["verdict"] == v).sum()) for v in ("held", "not held", "inconclusive")] + [len(claims)]
    assert [int(g) for g in counts.groups()] == expected
    # One line per claim, each with its seeds; the negative control pairs three seeds with three.
    for claim in claims["claim"].unique():
        assert claim in text, claim
    assert text.count("LPF increase over the loss") >= 1


def test_rules_are_stated_once_by_kind(report) -> None:
    out, page = report
    claims = pd.read_csv(out / "claims.csv", dtype=str, keep_default_na=False)
    kinds, labels = rule_kinds(claims)
    text = " ".join(page.sections["claims"])
    # Margin rules share a kind: fewer kinds than distinct rules, each stated once with m in place of its number.
    assert len(kinds) < claims["rule"].nunique()
    for i, kind in enumerate(kinds, 1):
        assert text.count(f"R{i}: {kind}") == 1
    assert all(rule not in text for rule in claims["rule"] if re.search(r"[+-]\d", rule))
    assert set(labels.str.split(" ").str[0]) == {f"R{i}" for i in range(1, len(kinds) + 1)}


def test_training_curves_draw_every_run_in_every_panel(tmp_path) -> None:
    from pipeline.report.collect import TRAINING_CURVES, collect
    from pipeline.report.figures import training_curves, training_runs
    from pipeline.report.study import Study

    settings = make_study(tmp_path, seeds=(0, 1), control_seeds=(100,), samples=False, metrics=("lpf",))
    study = Study(dict(settings))
    fig = training_curves(study, collect(study), {})
    axes = fig.get_axes()
    assert len(axes) == len(TRAINING_CURVES) * len(study.datasets)
    # 4 recipes x 2 seeds + the control's run, each in every panel, on a log scale.
    assert len(training_runs(study)) == 9
    assert all(len(ax.get_lines()) == 9 and ax.get_yscale() == "log" for ax in axes)
    assert [ax.get_ylabel() for ax in axes][0] == "training loss"
