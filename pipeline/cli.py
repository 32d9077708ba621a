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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from pipeline import progress
from pipeline.errors import PipelineError, disk_error_message
from pipeline.io.lock import claim_stage_outputs, release_outputs

# Order = order of the study: data, training, evaluation, metrics, report.
STAGES = {
    "prepare": "pipeline.stages.prepare",
    "fid-reference": "pipeline.stages.fid_reference",
    "kid-reference": "pipeline.stages.kid_reference",
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


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments end in one line naming the flag and the problem (no usage dump), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsOnceFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help text already states it, or it is None or an off switch; the
    description (the stage's docstring) is printed as written, so its example commands stay one per line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen stage's module is imported (every job pays for its imports)."""
    parser = OneLineErrorParser(
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
            formatter_class=DefaultsOnceFormatter)
        module.add_arguments(stage_parser)
        # Name --no-progress only where the stage has it.
        switch = " or with --no-progress" if "--no-progress" in stage_parser._option_string_actions else ""
        stage_parser.add_argument(
            "--progress-every", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
            help=f"seconds between plain progress lines in logs (without a terminal{switch}); default "
                 f"${progress.INTERVAL_VARIABLE}, else {progress.DEFAULT_INTERVAL:g}")
        stage_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(stage if stage in STAGES else None).parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a refused argument (2): a status like any other
        return exit_.code
    log = logging.getLogger(__name__)
    started = time.perf_counter()
    try:
        every = getattr(args, "progress_every", None)
        progress.configure(progress.interval_from_environment() if every is None else every)
        claim_stage_outputs(args)
        args._run(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        message = disk_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        release_outputs()
    # The stage's own summary says what it wrote; this line closes every log with the wall time
    # (once: under torchrun every process shares the log, and RANK 0 speaks for them).
    if os.environ.get("RANK", "0") == "0":
        log.info("%s: finished in %s", args.stage, progress.duration(time.perf_counter() - started))
    return 0
