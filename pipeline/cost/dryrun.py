"""The jobs of a plan, read from `snakemake --dry-run` (rule, wildcards, resources of each job).

Snakemake 9 prints every planned job as a block starting with `rule NAME:` (or `localrule NAME:`)
followed by indented `key: value` lines; this reads the blocks' `wildcards` and `resources`
lines, which is all the cost model needs. Jobs without a shell command (the `all` target) are kept
and cost nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.errors import PipelineError

_RULE = re.compile(r"^(?:local)?rule (\w+):\s*$")
_FIELD = re.compile(r"^\s+(\w+): (.*)$")


@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)


def _pairs(text: str) -> dict[str, str]:
    """`a=1, b=x` -> {'a': '1', 'b': 'x'} (wildcard values here never hold ', ')."""
    pairs = {}
    for item in text.split(", "):
        key, sep, value = item.partition("=")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs


def parse_dry_run(text: str) -> list[Job]:
    """Every job block of a dry run's output, in printed order."""
    jobs: list[Job] = []
    rule, fields = None, {}
    for line in text.splitlines():
        match = _RULE.match(line)
        if match:
            if rule is not None:
                jobs.append(Job(rule, _pairs(fields.get("wildcards", "")), _pairs(fields.get("resources", ""))))
            rule, fields = match.group(1), {}
            continue
        if rule is None:
            continue
        field_match = _FIELD.match(line)
        if field_match:
            fields[field_match.group(1)] = field_match.group(2)
        elif line and not line.startswith(" "):
            jobs.append(Job(rule, _pairs(fields.get("wildcards", "")), _pairs(fields.get("resources", ""))))
            rule, fields = None, {}
    if rule is not None:
        jobs.append(Job(rule, _pairs(fields.get("wildcards", "")), _pairs(fields.get("resources", ""))))
    return jobs


def snakemake_executable() -> str:
    """The snakemake beside the running interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "snakemake"
    return str(beside) if beside.exists() else "snakemake"


def planned_jobs(workdir: str | Path, configfiles: Sequence[str], everything: bool = False,
                 extra_args: Sequence[str] = ()) -> list[Job]:
    """The jobs `snakemake -n` plans in `workdir` (all of them with `everything`: --forceall)."""
    command = [snakemake_executable(), "--dry-run", "--cores", "1", "--directory", str(workdir),
               "--snakefile", str(Path(workdir) / "Snakefile")]
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    if everything:
        command.append("--forceall")
    command += list(extra_args)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PipelineError("snakemake was not found beside this Python or on PATH; run the plan "
                            "command with the venv's python (.venv/bin/python -m pipeline plan).") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PipelineError("snakemake --dry-run failed: " + " | ".join(tail))
    return parse_dry_run(done.stdout + "\n" + done.stderr)
