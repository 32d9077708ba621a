"""A report table and its four renderings: CSV, Markdown, a LaTeX tabular and an HTML page.

Cells are already formatted strings (tables.py decides digits and intervals), so the four
files show the same text. Markdown and LaTeX are written here rather than through pandas, whose
writers need optional packages (tabulate, jinja2) that the project does not declare; the HTML
grid is written here too, to class text and number columns apart. The HTML page is what the
Snakemake report shows inline (it embeds .html results; .csv/.md/.tex are only download links).
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import pandas as pd

from pipeline.io.atomic import atomic_path

EXTENSIONS = ("csv", "md", "tex", "html")
# Columns that hold names rather than numbers: left-aligned in Markdown and LaTeX.
TEXT_COLUMNS = {"dataset", "algorithm", "recipe", "claim", "id", "condition", "held", "evidence",
                "selected", "rho", "note", "measure", "comparison", "interval", "rule", "verdict"}
# LaTeX: a column whose longest cell is longer than this wraps in a p{} column, sized so that the
# table fits \linewidth (the claims' rule, measure and claim would otherwise run off the page).
WRAP_CHARACTERS = 20
# Font sizes tried in turn until the table fits: (commands, characters per \linewidth, share of
# \linewidth one column gap takes: 2 \tabcolsep of a 470pt line).
LATEX_SIZES = ((r"\small",), 85, 0.026), ((r"\footnotesize", r"\setlength{\tabcolsep}{3pt}"), 100, 0.013), \
              ((r"\scriptsize", r"\setlength{\tabcolsep}{3pt}"), 120, 0.013)
MIN_WRAPPED_WIDTH = 0.05


@dataclasses.dataclass
class Table:
    """One table of the report.

    :param name: file stem, one of pipeline.layout.REPORT_TABLES.
    :param title: one line, printed above the Markdown table and as the LaTeX caption.
    :param frame: the cells, all strings; "" marks a cell with no value.
    :param notes: sentences printed under the table (selection of rho, seeds, sources).
    """

    name: str
    title: str
    frame: pd.DataFrame
    notes: list[str] = dataclasses.field(default_factory=list)


def write_table(table: Table, out_dir: str | Path, html_body: str | None = None) -> list[Path]:
    """Write {name}.csv, {name}.md, {name}.tex and {name}.html into `out_dir`, each atomically
    (html_body: the HTML page's body under the title, in place of the plain grid and notes)."""
    out_dir = Path(out_dir)
    texts = {"csv": table.frame.to_csv(index=False, lineterminator="\n"),
             "md": to_markdown(table), "tex": to_latex(table), "html": to_html(table, html_body)}
    paths = []
    for ext in EXTENSIONS:
        path = out_dir / f"{table.name}.{ext}"
        with atomic_path(path) as tmp:
            tmp.write_text(texts[ext], encoding="utf-8")
        paths.append(path)
    return paths


def markdown_grid(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `frame` (no title, no notes)."""
    def escape(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(escape(c) for c in frame.columns) + " |"
    rule = "|" + "|".join(":---" if c in TEXT_COLUMNS else "---:" for c in frame.columns) + "|"
    body = ["| " + " | ".join(escape(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def to_markdown(table: Table) -> str:
    parts = [f"### {table.title}", "", markdown_grid(table.frame)]
    if table.notes:
        parts += ["", *[f"- {note}" for note in table.notes]]
    return "\n".join(parts) + "\n"


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"$<$", ">": r"$>$", "|": r"$|$",  # OT1 text fonts print these as other glyphs
                  "±": r"$\pm$", "→": r"$\rightarrow$", "ε": r"$\epsilon$", "ρ": r"$\rho$",
                  "é": r"\'{e}",
                  # Table 3's sigma columns and its marks (fSGLD's own objective, unconverged Hessian):
                  # pdflatex's utf8 input does not know σ or †.
                  "σ": r"$\sigma$", "§": r"\S{}", "†": r"\dag{}"}


def latex_escape(text: object) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex_layout(frame: pd.DataFrame) -> tuple[tuple[str, ...], str]:
    r"""The font-size commands and the column spec: the largest LATEX_SIZES entry that fits \linewidth.

    Columns with cells longer than WRAP_CHARACTERS become p{width}: at least their longest word, at
    most their longest cell, and in between a share of what the unwrapped columns and the gaps
    leave of \linewidth, in proportion to how much they would wrap. Headers are left out: they wrap
    in a p{} column, and a long header over short l/r cells is the table's design, not overflow.
    """
    cells = {c: [str(v) for v in frame[c]] for c in frame.columns}
    longest = {c: max(map(len, values), default=0) for c, values in cells.items()}
    wrapped = [c for c in frame.columns if longest[c] > WRAP_CHARACTERS]
    for size, per_line, gap in LATEX_SIZES:
        word = {c: max(len(w) for v in cells[c] for w in v.split() or [""]) / per_line for c in wrapped}
        natural = {c: longest[c] / per_line for c in wrapped}
        unwrapped = sum(longest[c] for c in frame.columns if c not in wrapped) / per_line
        free = 1.0 - unwrapped - gap * len(frame.columns) - sum(word.values())
        slack = sum(natural[c] - word[c] for c in wrapped)
        widths = {c: max(word[c], MIN_WRAPPED_WIDTH,
                         min(natural[c], word[c] + (max(0.0, free) * (natural[c] - word[c]) / slack if slack else 0)))
                  for c in wrapped}
        if free >= 0:
            break
    spec = "".join(rf"p{{{widths[c]:.2f}\linewidth}}" if c in widths else ("l" if c in TEXT_COLUMNS else "r")
                   for c in frame.columns)
    return size, spec


def to_latex(table: Table) -> str:
    """A `table` environment with a plain tabular (\\hline rules, no extra packages) and a caption."""
    columns = list(table.frame.columns)
    size, spec = latex_layout(table.frame)
    lines = [f"% {table.name}: generated by `python -m pipeline report`",
             r"\begin{table}[t]", r"\centering", *size,
             rf"\begin{{tabular}}{{{spec}}}", r"\hline",
             " & ".join(latex_escape(c) for c in columns) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.frame.itertuples(index=False)]
    lines += [r"\hline", r"\end{tabular}"]
    caption = " ".join([table.title.rstrip(".") + ".", *table.notes])
    lines += [rf"\caption{{{latex_escape(caption)}}}", rf"\label{{tab:{table.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# The page is shown inside the Snakemake report's iframe, which carries no style of its own.
HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #111; }
p, li { max-width: 70em; line-height: 1.4; }
.wide { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 5px; vertical-align: top; }
th { background: #eee; }
td.text { text-align: left; max-width: 24em; }
td.number { text-align: right; white-space: nowrap; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { max-width: 70em; font-style: italic; }
nav ol ol { font-size: 13px; }
.counts { font-size: 16px; }
table.answers td:nth-child(4) { max-width: 52em; }
tr:nth-child(even) td { background: #f7f7f7; }
blockquote { border-left: 4px solid #c33; margin: 0.5em 0; padding: 0.2em 0.8em; background: #fdf3f3; }
"""


def html_page(title: str, body: str) -> str:
    """A standalone UTF-8 HTML page with the report's style."""
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{HTML_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def html_grid(frame: pd.DataFrame) -> str:
    """The cells as an HTML table: text columns left-aligned and wrapping, numbers right-aligned."""
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    kinds = ["text" if c in TEXT_COLUMNS else "number" for c in frame.columns]
    rows = ["<tr>" + "".join(f'<td class="{kind}">{html.escape(str(v))}</td>' for kind, v in zip(kinds, row))
            + "</tr>" for row in frame.itertuples(index=False)]
    return "<table>\n<thead><tr>" + header + "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


def html_list(items: list[str], ordered: bool = False) -> str:
    tag = "ol" if ordered else "ul"
    return f"<{tag}>\n" + "\n".join(f"<li>{html.escape(item)}</li>" for item in items) + f"\n</{tag}>"


def to_html(table: Table, body: str | None = None) -> str:
    """The table as a page: title, then `body`, by default the cells (scrolling sideways when wider than the
    window, so no column is cut off) and the notes."""
    if body is None:
        body = f'<div class="wide">{html_grid(table.frame)}</div>'
        if table.notes:
            body += "\n" + html_list(table.notes)
    return html_page(table.title, f"<h3>{html.escape(table.title)}</h3>\n{body}")
