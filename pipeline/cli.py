"""Command line: `python -m pipeline <stage> [options]`; every Snakemake rule calls one stage.

Each stage module under pipeline.stages provides a docstring (its first line is the help text),
`add_arguments(parser)` and `run(args)`. A PipelineError (bad config, data, checkpoint) is printed
as one message without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from pipeline.errors import PipelineError

# Order = order of the study: data, training, evaluation, metrics, report.
STAGES = {
    "prepare": "pipeline.stages.prepare",
    "fid-reference": "pipeline.stages.fid_reference",
    "calibration-samples": "pipeline.stages.calibration",
    "train": "pipeline.stages.train",
    "quantize": "pipeline.stages.quantize",
    "sample": "pipeline.stages.sample",
    "fid": "pipeline.stages.fid",
    "lpf": "pipeline.stages.lpf",
    "perturbation": "pipeline.stages.perturbation",
    "surface": "pipeline.stages.surface",
    "hessian": "pipeline.stages.hessian",
    "exposure": "pipeline.stages.exposure",
    "report": "pipeline.stages.report",
    "plan": "pipeline.stages.plan",
}


def _stage_module(name: str):
    return importlib.import_module(STAGES[name])


def _summary(name: str) -> str:
    """A stage's one-line help, read from its source without importing it (imports are slow)."""
    spec = importlib.util.find_spec(STAGES[name])
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen stage's module is imported (every job pays for its imports)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Stages of the flatness-in-diffusion-models pipeline. "
                    "Run `python -m pipeline <stage> --help` for a stage's options.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name in STAGES:
        if importlib.util.find_spec(STAGES[name]) is None:
            continue
        if name != stage:
            sub.add_parser(name, help=_summary(name))
            continue
        module = _stage_module(name)
        doc = (module.__doc__ or "").strip()
        stage_parser = sub.add_parser(
            name, help=_summary(name), description=doc,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(stage if stage in STAGES else None).parse_args(argv)
    try:
        args._run(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
