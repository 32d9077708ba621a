"""Command line: `python -m pipeline <stage> [options]`; every Snakemake rule calls one stage.

Each stage module under pipeline.stages provides a docstring (its first line is the help text),
`add_arguments(parser)` and `run(args)`. A PipelineError (bad config, data, checkpoint) is printed
as one message without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from pipeline.errors import PipelineError

# Order = order of the study: data, training, evaluation, metrics, report.
STAGES = {
    "prepare": "pipeline.stages.prepare",
    "fid-reference": "pipeline.stages.fid_reference",
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
}


def available_stages() -> dict[str, object]:
    """The stage modules that exist in this checkout, by command name."""
    modules = {}
    for name, module_name in STAGES.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Stages of the flatness-in-diffusion-models pipeline. "
                    "Run `python -m pipeline <stage> --help` for a stage's options.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, module in available_stages().items():
        doc = (module.__doc__ or "").strip()
        stage_parser = sub.add_parser(
            name, help=doc.splitlines()[0] if doc else name, description=doc,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
