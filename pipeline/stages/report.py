"""Write the report: the paper's Tables 1-5 and Figures 1, 2, 4-8 (+ fSGLD rows), claims, choices.

Reads every FID file, metric file and training log of the study (the report rule's inputs) and,
for Fig. 2, the samples.h5 of ADM, the chosen +SAM and fSGLD (raw and EMA weights, every
precision, first seed, smallest T'). Writes into --out-dir (default {results}/report): each
table of pipeline.layout.REPORT_TABLES as .csv, .md, .tex and .html, each figure of
REPORT_FIGURES as .png and .pdf, and index.md and index.html (contents, the claims, and the
choices the paper leaves open, as the inputs record them). report.sam_selection picks the rho behind the +SAM rows
(best_fid_<T'> or rho=<value>); the tables say which. A missing input is an error that names
the file and the rule that makes it; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.arguments import add_config_arguments
from pipeline import layout
from pipeline.report import build_report
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "the report's settings (pipeline.settings.ReportSettings)")
    parser.add_argument("--out-dir", default=None, help="output folder (default: {results}/report)")


def run(args: argparse.Namespace) -> None:
    settings, _ = read_settings(args, "report")
    out_dir = Path(args.out_dir or layout.report_dir(settings["results"]))
    written = build_report(settings, out_dir)
    logger.info("report: wrote %d files to %s", len(written), out_dir)
