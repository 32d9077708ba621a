"""Checks behind tests/cluster/run_slurm_test.sh: each subcommand exits 1 with a reason on failure.

    checks.py job-stats DRYRUN_LOG                      rule -> job count of a `snakemake -n` log (JSON)
    checks.py gpu-requests DRYRUN_LOG                   GPU requests on exactly the GPU rules' jobs
    checks.py scheduler RUN_LOG DRYRUN_LOG SLURM_LOGDIR JOBCOMP
                                                        every job of the DAG ran through SLURM
    checks.py compare DIR_A DIR_B                       two results folders hold the same numbers
    checks.py multi-gpu-training RUN_LOG TRAIN_H5 N     the train job held N GPUs on one node and ran N processes
    checks.py checkpoint-step RUN_DIR                   step of the run's training checkpoint (-1: none)
    checks.py watch-checkpoint RUN_DIR OUT_FILE DONE_FILE TIMEOUT
                                                        record every checkpoint step seen until DONE_FILE

SLURM is queried with squeue and scontrol (the test cluster runs without an accounting database)
and its job completion log; SLURM_CONF must point at the cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The rules that ask for a GPU (gpu: 1); every other rule must not.
GPU_RULES = frozenset({"train", "sample", "sample_validation", "fid_reference", "fid", "fid_validation",
                       "fid_calibration", "metric"})
# Rules Snakemake never submits: they have no shell command.
UNSUBMITTED_RULES = frozenset({"all"})


class CheckFailed(Exception):
    """A check did not hold; the message says what was found."""


# ------------------------------------------------------------------------------------------
# Snakemake logs.

def job_stats(dryrun_log: str | Path) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule name -> number of jobs (without the total)."""
    lines = Path(dryrun_log).read_text().splitlines()
    try:
        start = lines.index("Job stats:") + 3  # title, header, dashes
    except ValueError:
        raise CheckFailed(f"{dryrun_log} has no 'Job stats:' table") from None
    counts = {}
    for line in lines[start:]:
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            break
        counts[fields[0]] = int(fields[1])
    counts.pop("total", None)
    return counts


def dryrun_jobs(dryrun_log: str | Path) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run lists, resources as written (name -> text)."""
    jobs: list[tuple[str, dict[str, str]]] = []
    rule = None
    for line in Path(dryrun_log).read_text().splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            rule = header.group(1)
            jobs.append((rule, {}))
        elif rule is not None and line.startswith("    resources: "):
            pairs = (item.split("=", 1) for item in line.removeprefix("    resources: ").split(", "))
            jobs[-1][1].update({name: value for name, value in pairs})
    return jobs


def check_gpu_requests(dryrun_log: str | Path) -> str:
    """Every job of a GPU rule requests one GPU, and no other job requests any."""
    jobs = dryrun_jobs(dryrun_log)
    if not jobs:
        raise CheckFailed(f"{dryrun_log} lists no jobs")
    per_rule: dict[str, set[str]] = {}
    for rule, resources in jobs:
        per_rule.setdefault(rule, set()).add(resources.get("gpu", "0"))
    wrong = {rule: sorted(values) for rule, values in per_rule.items()
             if values != ({"1"} if rule in GPU_RULES else {"0"})}
    if wrong:
        raise CheckFailed(f"gpu requests per rule {wrong}; expected gpu=1 exactly on {sorted(GPU_RULES)}")
    missing = GPU_RULES - per_rule.keys()
    if missing:
        raise CheckFailed(f"the dry run has no jobs of the GPU rules {sorted(missing)}")
    counts = {rule: sum(1 for r, _ in jobs if r == rule) for rule in per_rule}
    return "; ".join(f"{rule}: {n} jobs, gpu={'1' if rule in GPU_RULES else '0'}"
                     for rule, n in sorted(counts.items()))


def submitted_jobs(run_log: str | Path) -> list[dict[str, str]]:
    """Every sbatch submission the SLURM executor logged: SLURM job id, rule, log path."""
    pattern = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
    jobs = []
    for line in Path(run_log).read_text().splitlines():
        match = pattern.search(line)
        if match:
            log = match.group(2)
            rule = re.search(r"/rule_(\w+?)(?:/|$)", log)
            jobs.append({"id": match.group(1), "log": log, "rule": rule.group(1) if rule else "?"})
    return jobs


# ------------------------------------------------------------------------------------------
# SLURM records.

def _run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol -d show job` of one job as key -> value (finished jobs stay for MinJobAge)."""
    text = _run("scontrol", "--details", "--oneliner", "show", "job", job_id)
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def squeue_state(job_id: str) -> str:
    return _run("squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T").strip()


def completion_records(jobcomp: str | Path) -> dict[str, dict[str, str]]:
    """The job completion log (jobcomp/filetxt): job id -> its fields."""
    records = {}
    for line in Path(jobcomp).read_text().splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if "JobId" in fields:
            records[fields["JobId"]] = fields
    return records


def check_scheduler(run_log: str | Path, dryrun_log: str | Path, slurm_logdir: str | Path,
                    jobcomp: str | Path) -> str:
    """Each job of the dry run's DAG was one completed SLURM job with its own log and request.

    Per job: squeue, scontrol and the completion log say COMPLETED, the scontrol comment names
    the rule, GPU rules asked for and held exactly one GPU and other rules none, and the
    SLURM log exists under SLURM_LOGDIR/rule_<rule>/.
    """
    expected = {rule: n for rule, n in job_stats(dryrun_log).items() if rule not in UNSUBMITTED_RULES}
    jobs = submitted_jobs(run_log)
    submitted: dict[str, int] = {}
    for job in jobs:
        submitted[job["rule"]] = submitted.get(job["rule"], 0) + 1
    if submitted != expected:
        raise CheckFailed(f"SLURM jobs per rule {submitted}, but the DAG has {expected}")
    records = completion_records(jobcomp)
    logdir = Path(slurm_logdir).resolve()
    for job in jobs:
        where = f"SLURM job {job['id']} (rule {job['rule']})"
        state = squeue_state(job["id"])
        info = scontrol_job(job["id"])
        record = records.get(job["id"], {})
        states = (state, info.get("JobState"), record.get("JobState"))
        if states != ("COMPLETED",) * 3:
            raise CheckFailed(f"{where}: squeue / scontrol / jobcomp states {states}")
        comment = info.get("Comment", "")
        if comment != f"rule_{job['rule']}" and not comment.startswith(f"rule_{job['rule']}_wildcards_"):
            raise CheckFailed(f"{where}: comment {comment!r} does not name the rule")
        # TresPerJob is the request (--gpus=1), JOB_GRES what the job was given.
        wanted = 1 if job["rule"] in GPU_RULES else 0
        requested, held = (re.search(r"gpu:(\d+)$", info.get(key, "")) for key in ("TresPerJob", "JOB_GRES"))
        counts = tuple(int(m.group(1)) if m else 0 for m in (requested, held))
        if counts != (wanted, wanted):
            raise CheckFailed(f"{where}: requested / held {counts} GPUs, expected {wanted} "
                              f"(TresPerJob={info.get('TresPerJob')}, JOB_GRES={info.get('JOB_GRES')})")
        log = Path(job["log"]).resolve()
        folder = log.relative_to(logdir).parts[0] if logdir in log.parents else None
        if not log.is_file() or folder != f"rule_{job['rule']}":
            raise CheckFailed(f"{where}: no SLURM log at {log} under {logdir}/rule_{job['rule']}/")
    return (f"{len(jobs)} SLURM jobs, all COMPLETED in squeue, scontrol and the completion log, "
            f"each with its log under {logdir}: " + ", ".join(f"{r} {n}" for r, n in sorted(submitted.items())))


def check_multi_gpu_training(run_log: str | Path, train_h5: str | Path, gpus: str) -> str:
    """The run's one train job asked for and held `gpus` GPUs on one node, and trained as that
    many data-parallel processes (train.h5 records the process count)."""
    import h5py

    wanted = int(gpus)
    jobs = [job for job in submitted_jobs(run_log) if job["rule"] == "train"]
    if len(jobs) != 1:
        raise CheckFailed(f"expected one train job in {run_log}, found {len(jobs)}")
    job_id = jobs[0]["id"]
    info = scontrol_job(job_id)
    requested, held = (re.search(r"gpu:(\d+)$", info.get(key, "")) for key in ("TresPerJob", "JOB_GRES"))
    counts = tuple(int(m.group(1)) if m else 0 for m in (requested, held))
    if counts != (wanted, wanted) or info.get("NumNodes") != "1" or info.get("JobState") != "COMPLETED":
        raise CheckFailed(f"SLURM job {job_id}: requested / held {counts} GPUs on {info.get('NumNodes')} "
                          f"node(s), state {info.get('JobState')}; expected {wanted} GPUs, 1 node, COMPLETED")
    with h5py.File(train_h5, "r") as f:
        processes = int(f.attrs["processes"])
    if processes != wanted:
        raise CheckFailed(f"{train_h5} was trained by {processes} process(es), expected {wanted}")
    return f"SLURM job {job_id} held {wanted} GPUs on 1 node and trained as {processes} processes"


# ------------------------------------------------------------------------------------------
# Results.

# Attributes that describe the run rather than the result: timings, hosts, versions.
_VOLATILE_ATTR = re.compile(r"seconds|wall|time|created|host|version|revision", re.IGNORECASE)


def _h5_values(path: Path) -> dict[str, Any]:
    """Every dataset and every numeric attribute of an HDF5 file, timings left out.

    Text attributes are provenance (paths, dates, hosts, settings) or SHA-256 hashes of whole
    input files, which carry their own creation dates; the values those files hold are compared
    where the files themselves are.
    """
    import h5py
    import numpy as np

    values: dict[str, Any] = {}

    def keep_attrs(name: str, attrs: Any) -> None:
        for key, value in attrs.items():
            if _VOLATILE_ATTR.search(key):
                continue
            if not isinstance(value, (bytes, str)):
                values[f"{name}@{key}"] = np.asarray(value)

    with h5py.File(path, "r") as f:
        keep_attrs("/", f.attrs)

        def visit(name: str, obj: Any) -> None:
            keep_attrs(name, obj.attrs)
            if isinstance(obj, h5py.Dataset) and not _VOLATILE_ATTR.search(name):
                values[name] = obj[()]

        f.visititems(visit)
    return values


def _same_h5(a: Path, b: Path) -> str | None:
    import numpy as np

    va, vb = _h5_values(a), _h5_values(b)
    if va.keys() != vb.keys():
        return f"different contents: {sorted(va.keys() ^ vb.keys())}"
    for key in va:
        x, y = np.asarray(va[key]), np.asarray(vb[key])
        same = np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
        if not same:
            return f"{key} differs: {x!r} vs {y!r}"[:300]
    return None


def _same_weights(a: Path, b: Path) -> str | None:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    if sa.keys() != sb.keys():
        return f"different tensors: {sorted(sa.keys() ^ sb.keys())}"
    for key in sa:
        if not torch.equal(sa[key], sb[key]):
            return f"tensor {key} differs (max |diff| {(sa[key].double() - sb[key].double()).abs().max():.3g})"
    return None


def compare_results(dir_a: str | Path, dir_b: str | Path) -> str:
    """Weights (torch.equal), HDF5 values and grid PNGs (bytes) of two results folders agree.

    Logs and the report's text and PDF files (which carry dates and paths) are not compared.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)

    def artifacts(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*")
                if p.suffix in (".pt", ".h5", ".png") and "logs" not in p.relative_to(root).parts}

    found_a, found_b = artifacts(dir_a), artifacts(dir_b)
    if found_a != found_b:
        raise CheckFailed(f"only in {dir_a}: {sorted(map(str, found_a - found_b))}; "
                          f"only in {dir_b}: {sorted(map(str, found_b - found_a))}")
    if not found_a:
        raise CheckFailed(f"{dir_a} holds no weights or HDF5 files")
    kinds: dict[str, int] = {}
    for rel in sorted(found_a):
        a, b = dir_a / rel, dir_b / rel
        if rel.suffix == ".pt":
            problem = _same_weights(a, b)
        elif rel.suffix == ".h5":
            problem = _same_h5(a, b)
        else:
            problem = None if a.read_bytes() == b.read_bytes() else "the PNG bytes differ"
        if problem:
            raise CheckFailed(f"{rel}: {problem}")
        kinds[rel.suffix] = kinds.get(rel.suffix, 0) + 1
    return "identical: " + ", ".join(f"{n} {suffix} files" for suffix, n in sorted(kinds.items()))


# ------------------------------------------------------------------------------------------
# Training checkpoints.

def checkpoint_step(run_dir: str | Path) -> int:
    """The step stored in the run folder's checkpoint-<hash>.pt, or -1 if there is none."""
    import torch

    for path in sorted(Path(run_dir).glob("checkpoint-*.pt")):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
        except (OSError, RuntimeError, EOFError):
            continue  # replaced between glob and load (the stage writes it atomically)
    return -1


def watch_checkpoint(run_dir: str | Path, out_file: str | Path, done_file: str | Path, timeout: float) -> None:
    """Append each new checkpoint step seen in `run_dir` to `out_file` until `done_file` exists."""
    deadline = time.monotonic() + timeout
    last = None
    with open(out_file, "a") as out:
        while not Path(done_file).exists() and time.monotonic() < deadline:
            step = checkpoint_step(run_dir)
            if step != last and step >= 0:
                out.write(f"{step}\n")
                out.flush()
                last = step
            time.sleep(0.5)


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    try:
        if command == "job-stats":
            print(json.dumps(job_stats(*args), sort_keys=True))
        elif command == "gpu-requests":
            print(check_gpu_requests(*args))
        elif command == "scheduler":
            print(check_scheduler(*args))
        elif command == "compare":
            print(compare_results(*args))
        elif command == "multi-gpu-training":
            print(check_multi_gpu_training(*args))
        elif command == "checkpoint-step":
            print(checkpoint_step(*args))
        elif command == "watch-checkpoint":
            watch_checkpoint(args[0], args[1], args[2], float(args[3]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except CheckFailed as failure:
        print(f"CHECK FAILED ({command}): {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
