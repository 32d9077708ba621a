"""Per-stage staleness: each rule's code inputs are the files its stage imports, nothing more.

The rule -> stage map is the Snakefile's (workflow/rules/common.smk: CODE[rule] = the import
closure of cli.STAGES[stage]); the import closure is pipeline/codedeps.py's. Checked here against
Python's own import machinery, and once end to end: on a workflow whose outputs all exist and are
up to date, an edit to pipeline/flatness/lpf.py plans only the LPF jobs and the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import codedeps
from pipeline.cli import STAGES
from pipeline.cost.dryrun import parse_dry_run
from pipeline.settings import METRICS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
# The stages that rules run (plan is a command for people, not a rule).
RULE_STAGES = {name: module for name, module in STAGES.items() if name != "plan"}


def rel(path: str | Path) -> str:
    return str(Path(path).resolve().relative_to(PACKAGE))


@pytest.fixture(scope="module")
def sources() -> dict[str, set[str]]:
    return {stage: {rel(f) for f in codedeps.source_files(module)} for stage, module in RULE_STAGES.items()}


def test_every_stage_lists_its_own_module_and_no_plumbing(sources):
    for stage, files in sorted(sources.items()):
        print(f"{stage}: {', '.join(sorted(files))}")
        own = rel(codedeps.module_file(RULE_STAGES[stage]))
        assert own in files, stage
        plumbing = {f for f in files if f.startswith("io/") or f in
                    {"cli.py", "errors.py", "config.py", "settings.py", "layout.py", "device.py"}}
        assert not plumbing, (stage, plumbing)


def test_each_metric_depends_on_its_own_metric_module_only(sources):
    for metric in METRICS:
        own = {f"flatness/{metric}.py", f"stages/{metric}.py"}
        others = {f"flatness/{m}.py" for m in METRICS if m != metric} | {f"stages/{m}.py" for m in METRICS if m != metric}
        assert own <= sources[metric], metric
        # exposure's stage uses the evaluation set's image subset, a shared piece, not another metric.
        assert not (others - {"flatness/evalset.py"}) & sources[metric], (metric, others & sources[metric])
    # The shared pieces every metric really uses.
    for shared in ("flatness/model_setup.py", "flatness/weights.py", "stages/metric_common.py", "nn/unet.py"):
        assert all(shared in sources[m] for m in METRICS), shared


def test_an_edit_plans_exactly_the_rules_that_import_the_file(sources):
    """For every science file: the stages whose code inputs hold it are the stages importing it."""
    files = {rel(p) for p in PACKAGE.rglob("*.py")
             if "__pycache__" not in p.parts and not codedeps.is_plumbing(_module_name(p))}
    expected = {"flatness/lpf.py": {"lpf"}, "flatness/hessian.py": {"hessian"},
                "stages/metric_common.py": set(METRICS), "optim/sam.py": {"train"},
                "report/tables.py": {"report"}, "quant.py": {"quantize"}}
    for file in sorted(files):
        planned = {stage for stage, listed in sources.items() if file in listed}
        if file in expected:
            assert planned == expected[file], (file, planned)
    # And the closure agrees with what Python imports: nothing listed that a stage does not import,
    # and whatever it imports but is not listed comes in through plumbing only.
    # Everything plumbing imports, transitively, with the parent packages Python imports on the way.
    plumbing_imports, todo = set(), [m for m in codedeps.PLUMBING
                                     if (path := codedeps.module_file(m)) is not None and path.name != "__init__.py"]
    while todo:
        module = todo.pop()
        if module in plumbing_imports:
            continue
        plumbing_imports.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]
        path = codedeps.module_file(module)
        if path is not None:
            todo += codedeps._imported_modules(path, PACKAGE)
    plumbing_files = {rel(codedeps.module_file(m)) for m in plumbing_imports if codedeps.module_file(m)}
    for stage, module in RULE_STAGES.items():
        imported = _runtime_imports(module)
        assert sources[stage] <= imported, (stage, sources[stage] - imported)
        assert imported - sources[stage] <= plumbing_files, (stage, imported - sources[stage])


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(module: str) -> set[str]:
    """The science files of pipeline/ that importing `module` really loads, in a fresh process."""
    code = (f"import sys, json, {module}\n"
            "from pipeline.codedeps import is_plumbing\n"
            "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('pipeline.') "
            "and getattr(m, '__file__', None) and not is_plumbing(n))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return {rel(f) for f in json.loads(out)}


def _snakemake(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "config/demo.yaml",
                           *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_lpf_edit_plans_only_lpf_jobs_and_the_report(tmp_path):
    """End to end on the demo's DAG with every output present (made empty, then --touch'ed in order)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("config", "workflow", "pipeline"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    outputs = set()
    for line in _snakemake(root, "-n").splitlines():
        if line.startswith(("    output: ", "    log: ")):
            outputs.update(p.strip() for p in line.split(": ", 1)[1].split(","))
    for path in outputs:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()
    _snakemake(root, "--touch")
    assert "Nothing to be done" in _snakemake(root, "-n")

    lpf = root / "pipeline" / "flatness" / "lpf.py"
    lpf.write_text(lpf.read_text() + "\n# edited\n")
    jobs = parse_dry_run(_snakemake(root, "-n"))
    assert {job.rule for job in jobs} == {"metric", "report", "all"}
    assert {job.wildcards["metric"] for job in jobs if job.rule == "metric"} == {"lpf"}
    # LPF on every average of the 3 recipes, and on the negative control's raw weights.
    assert sum(job.rule == "metric" for job in jobs) == 10
