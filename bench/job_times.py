"""Job time per rule of a finished Snakemake run, summed from its log.

Snakemake stamps each job's start ("[date]", then "rule NAME:" or "localrule NAME:" and "jobid: N")
and its end ("[date]", then "Finished jobid: N"); the difference is the job's wall time, 1 s
resolution. Summed over the jobs of a rule it is the device time a run spent there, the figure
`plan` estimates; divided by the cores it approaches the wall time when the cores stay busy.

    python bench/job_times.py                      # the newest log in .snakemake/log/
    python bench/job_times.py path/to/snakemake.log
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")
JOB = re.compile(r"^jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def job_seconds(lines: list[str]) -> dict[str, list[float]]:
    """Rule -> wall seconds of each of its finished jobs (jobs that never finished are left out)."""
    stamp, pending = None, None
    started: dict[str, tuple[str, datetime]] = {}
    seconds: dict[str, list[float]] = collections.defaultdict(list)
    for line in (raw.strip() for raw in lines):
        if match := STAMP.match(line):
            stamp, pending = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y"), None
        elif (match := RULE.match(line)) and stamp is not None:
            pending = match.group(1)
        elif (match := JOB.match(line)) and pending is not None:
            started[match.group(1)] = (pending, stamp)
            pending = None
        elif (match := FINISHED.match(line)) and match.group(1) in started:
            rule, began = started.pop(match.group(1))
            seconds[rule].append((stamp - began).total_seconds())
    return dict(seconds)


def newest_log() -> Path:
    logs = sorted(Path(".snakemake/log").glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        sys.exit("job_times: no .snakemake/log/*.snakemake.log here; pass the log's path.")
    return logs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", type=Path, help="a Snakemake log (default: the newest in .snakemake/log/)")
    args = parser.parse_args()
    path = args.log or newest_log()
    per_rule = job_seconds(path.read_text(errors="replace").splitlines())
    print(f"{path}: job wall time per rule, summed")
    print(f"{'rule':<22} {'jobs':>5} {'seconds':>9} {'longest':>8}")
    for rule, times in sorted(per_rule.items(), key=lambda item: -sum(item[1])):
        print(f"{rule:<22} {len(times):>5} {sum(times):>9,.0f} {max(times):>8,.0f}")
    total = [t for times in per_rule.values() for t in times]
    print(f"{'total':<22} {len(total):>5} {sum(total):>9,.0f}")


if __name__ == "__main__":
    main()
