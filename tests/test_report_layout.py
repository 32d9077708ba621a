"""How the report reads: LaTeX tables that fit the page, HTML renderings, figure labels and legends,
and an index that explains its open choices without citing documents outside the repository."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from matplotlib.legend import Legend

from pipeline.report.collect import collect
from pipeline.report.figures import FIGURE_BUILDERS
from pipeline.report.index import index_html, index_markdown, open_choices
from pipeline.report.render import Table, latex_layout, to_html, to_latex
from pipeline.report.study import Study, select_sam
from test_report import make_study  # the synthetic one-seed study of the report tests

LONG_RULE = ("held if the 95% CI lies below 0, not held if above 0, else inconclusive; one training seed: "
             "a difference between training runs is not decided on draw-level noise")


def widths(spec: str) -> list[float]:
    return [float(w) for w in re.findall(r"p\{([0-9.]+)\\linewidth\}", spec)]


def test_claims_latex_wraps_its_long_columns_within_the_line() -> None:
    frame = pd.DataFrame([{"id": "C1", "claim": "+SAM is flatter than ADM", "dataset": "cifar10",
                           "measure": "LPF filter (sigma 0.01): +SAM - ADM", "effect [CI]": "+0.0045 [+0.0022, +0.0068]",
                           "rule": LONG_RULE, "verdict": "inconclusive"}] * 3)
    size, spec = latex_layout(frame)
    # id, dataset and verdict are short and stay l; claim, measure, effect and rule wrap.
    assert spec.startswith("lp{") and spec.endswith("l") and spec.count("p{") == 4
    assert widths(spec)[-1] == max(widths(spec)), "the longest column, the rule, gets the most room"
    assert sum(widths(spec)) < 1.0
    assert size[0] == r"\small"
    tex = to_latex(Table("claims", "Claims", frame))
    assert rf"\begin{{tabular}}{{{spec}}}" in tex


def test_short_tables_keep_plain_columns() -> None:
    frame = pd.DataFrame([{"algorithm": "+SAM", "FID (T'=20)": "3.2 [3.0, 3.4]"}])
    assert latex_layout(frame) == ((r"\small",), "lr")


def test_html_table_escapes_and_keeps_its_notes() -> None:
    page = to_html(Table("t", "A <b> title", pd.DataFrame([{"algorithm": "+SAM <x>", "FID": "1 & 2"}]),
                         ["note with σ"]))
    assert page.startswith("<!doctype html>") and '<meta charset="utf-8">' in page
    assert "A &lt;b&gt; title" in page and "+SAM &lt;x&gt;" in page and "1 &amp; 2" in page
    assert '<td class="text">' in page and '<td class="number">' in page and "<li>note with σ</li>" in page


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    settings = make_study(tmp_path_factory.mktemp("layout"))
    study = Study(dict(settings))
    data = collect(study)
    return study, data, select_sam(study, data.validation, data.metric_name)


def test_index_explains_open_choices_without_outside_documents(built) -> None:
    study, data, choices = built
    items = open_choices(study, data, choices)
    # Each item says what the paper leaves open (in parentheses) before this run's setting.
    assert all(re.match(r"\d+\. [^:(]+\(", item) for item in items), items
    for render in (index_markdown, index_html):
        text = render(study, data, choices, [], {})
        assert "SPEC" not in text and "section 12" not in text
    assert "<ol>" in index_html(study, data, choices, [], {})


def test_figures_use_mathtext_and_keep_legends_off_the_data(built) -> None:
    study, data, choices = built
    for name in ("fig5_loss_vs_perturbation", "fig6_eps_norm"):
        fig = FIGURE_BUILDERS[name](study, data, choices)
        axes = fig.get_axes()
        assert all(ax.get_legend() is None for ax in axes), f"{name}: a legend inside a panel"
        legends = [child for child in fig.get_children() if isinstance(child, Legend)]
        assert len(legends) == 1, name
        labels = [text.get_text() for text in legends[0].get_texts()]
        assert all("$" in ax.get_ylabel() for ax in axes), name
        assert not any("||" in ax.get_xlabel() + ax.get_ylabel() for ax in axes), name
        if name == "fig5_loss_vs_perturbation":
            assert any(label.startswith("shaded band: ±1 std over random directions") for label in labels)
        else:
            assert "training inputs, other algorithms" in labels and any("sqrt{CHW}" in label for label in labels)
            for ax in axes:
                # Inverted: t = 1000 on the left, so the label's "left to right" is the sampling direction.
                left, right = ax.get_xlim()
                assert left > right and "sampling runs left to right" in ax.get_xlabel()
