"""The final report: the paper's tables and figures (+ fSGLD rows), claims and open choices.

build_report(settings, out_dir) reads every FID file, metric file and training log of the study
(paths from pipeline.layout), and writes the tables of layout.REPORT_TABLES as CSV, Markdown and
LaTeX, the figures of layout.REPORT_FIGURES as PNG and PDF, and index.md.
"""

from pipeline.report.build import build_report

__all__ = ["build_report"]
