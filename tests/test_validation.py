"""Config and argument validation: every bad input ends in one line naming the problem and the fix.

Stages run in-process through `pipeline.cli.main` (stderr captured); the workflow is planned with
`snakemake -n` on small overlays, as in test_workflow.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import arguments
from pipeline.cli import STAGES, build_parser, main
from pipeline.config import DEFAULT_CONFIG, deep_merge, load_config, nonfinite_problems, read_yaml
from pipeline.errors import PipelineError
from pipeline.settings import config_problems

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_stage(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `python -m pipeline <argv>`, run in this process."""
    status = main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line(status: int, err: str, expected: str) -> None:
    assert status == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.rstrip("\n") == expected


def plan(tmp_path: Path, *overlays: str) -> subprocess.CompletedProcess:
    """`snakemake -n` over config.yaml plus the overlays (YAML text), in the repository."""
    files = []
    for i, text in enumerate(overlays):
        path = tmp_path / f"overlay{i}.yaml"
        path.write_text(text)
        files.append(str(path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*SNAKEMAKE, "-n", "--configfile", *files], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def problem_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The '  - ...' lines of the workflow's 'invalid config:' message."""
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid config:" in out, out[-3000:]
    return [line[4:] for line in out.splitlines() if line.startswith("  - ")]


# ------------------------------------------------------------------------------------------
# Under Snakemake: duplicate keys, NaN and infinities, schema errors without the schema, cross-checks.

def test_planning_refuses_duplicates_nonfinite_numbers_and_typos_in_one_line_each(tmp_path):
    result = plan(tmp_path,
                  "recipes:\n  adm: {}\n  adm: {sam: {rho: 0.5}}\n",
                  "recipes:\n  sam_rho0.1: {sam: {rho: .inf}}\n"
                  "training:\n  optimizer: {lr: .inf, betas: [.nan, 0.999]}\n  ema: {decay: .nan}\n",
                  "trainig: {steps: 5}\n")
    lines = problem_lines(result)
    assert lines == [
        f"config file {tmp_path / 'overlay0.yaml'}: key 'adm' appears twice (lines 2 and 3); keep one of them.",
        "recipes.sam_rho0.1.sam.rho = inf: numbers must be finite; write a finite value",
        "training.optimizer.lr = inf: numbers must be finite; write a finite value",
        "training.optimizer.betas[0] = nan: numbers must be finite; write a finite value",
        "training.ema.decay = nan: numbers must be finite; write a finite value",
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_top_level_typo_is_one_line_not_the_schema(tmp_path):
    result = plan(tmp_path, "trainig: {steps: 5}\n")
    assert problem_lines(result) == [
        "(top level): unknown key(s) trainig; allowed: datasets, device, fid, metrics, quantization, recipes, "
        "report, results, sampling, study, training"]
    out = result.stdout + result.stderr
    assert "additionalProperties" not in out and "definitions" not in out
    assert len(out.splitlines()) < 15, out


def test_cross_checks_run_at_planning_time(tmp_path):
    """Preset vs resolution and fSGLD's SGD base with momentum: before any job, not in train."""
    result = plan(tmp_path, "datasets:\n  cifar10: {preset: fmnist16}\n"
                            "recipes:\n  fsgld: {optimizer: {momentum: 0.9}}\n")
    assert problem_lines(result) == [
        "datasets.cifar10: preset fmnist16 is built for 16px images but resolution is 32; pick a preset of "
        "that size or change it.",
        "recipe 'fsgld': fSGLD's SGD base has no momentum (the Langevin dynamics it samples are first order); "
        "set optimizer.momentum: 0.",
    ]


@pytest.mark.parametrize("overlay, message", [
    ({"recipes": {"adm": {"optimizer": {"momentum": 0.9}}}},
     "recipe 'adm': optimizer.momentum = 0.9 has no effect on adamw (its betas play that role); set it to 0 "
     "or use name: sgd."),
    ({"recipes": {"fsgld": {"fsgld": {"antithetic": True}}}},
     "recipe 'fsgld': fsgld.antithetic pairs +eps with -eps, so it needs fsgld.n_pert: 2, got 1."),
    ({"training": {"steps": 5, "swa": {"start_fraction": 0.05}}},
     "training.swa.start_fraction = 0.05 of 5 steps starts SWA at step 0, averaging in the untrained "
     "weights; raise either."),
    ({"training": {"processes": 3}},
     "datasets.cifar10.batch_size = 128 is not a multiple of training.processes = 3; each process takes "
     "an equal share."),
])
def test_config_problems_cross_checks(overlay, message):
    problems = config_problems(deep_merge(load_config(), overlay))
    assert message in problems, problems


def test_shipped_configs_pass_every_check():
    for overlay in (None, "config/demo.yaml", "config/cpu-study.yaml"):
        config = load_config([DEFAULT_CONFIG] + ([REPO / overlay] if overlay else []))
        assert config_problems(config) == [], overlay


# ------------------------------------------------------------------------------------------
# The loader shared by the stages.

def test_duplicate_key_names_file_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("metrics:\n  lpf:\n    draws: 4\n    sigma: 0.1\n    draws: 8\n")
    with pytest.raises(PipelineError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"config file {path}: key 'draws' appears twice (lines 3 and 5); keep one of them."


def test_nonfinite_walk_reaches_lists_and_nesting():
    config = {"a": {"b": [1.0, float("nan")], "c": float("-inf")}, "d": 1.0, "e": "nan"}
    assert nonfinite_problems(config) == [
        "a.b[1] = nan: numbers must be finite; write a finite value",
        "a.c = -inf: numbers must be finite; write a finite value",
    ]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, problem", [
    ("training:\n  optimizr: {lr: 1}\n",
     "training: unknown key(s) optimizr; allowed: checkpoint_every, cuda, diffusion, ema, log_every, optimizer, "
     "processes, schedule_sampler, steps, swa, threads_per_process"),
    ("recipes:\n  sam_rho0.1: {sam: {rho: abc}}\n", "recipes.sam_rho0.1.sam.rho: 'abc' is not of type 'number'"),
    ("recipes:\n  fsgld: {fsgld: {eta: .nan}}\n",
     "recipes.fsgld.fsgld.eta = nan: numbers must be finite; write a finite value"),
])
def test_train_config_file_is_validated_like_snakemake(tmp_path, capsys, text, problem):
    bad = write(tmp_path, text)
    status, err = run_stage(capsys, "train", "--dataset", "fashion_mnist", "--recipe", "adm",
                            "--config", str(DEFAULT_CONFIG), "--config", bad)
    assert_one_line(status, err, f"error: invalid config ({DEFAULT_CONFIG}, {bad}): {problem}")


def test_stage_loader_refuses_duplicate_keys(tmp_path, capsys):
    bad = write(tmp_path, "recipes:\n  adm: {}\n  adm: {sam: {rho: 0.5}}\n")
    status, err = run_stage(capsys, "train", "--dataset", "fashion_mnist", "--recipe", "adm", "--config", bad)
    assert_one_line(status, err, f"error: config file {bad}: key 'adm' appears twice (lines 2 and 3); "
                                 f"keep one of them.")


def test_metric_config_with_zero_draws_is_refused(tmp_path, capsys):
    bad = write(tmp_path, "metrics:\n  lpf: {draws: 0}\n")
    status, err = run_stage(capsys, "lpf", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "o.h5"),
                            "--dataset", "fashion_mnist", "--config", bad)
    # config.yaml is merged first, as under Snakemake: the message names both files.
    assert_one_line(status, err, f"error: invalid config ({DEFAULT_CONFIG}, {bad}): metrics.lpf.draws: 0 is less "
                                 f"than the minimum of 1")


def test_metric_settings_json_slice_is_validated(tmp_path, capsys):
    status, err = run_stage(capsys, "lpf", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "o.h5"),
                            "--dataset", "fashion_mnist", "--settings", '{"metrics": {"lpf": {"draws": -1}}}')
    assert_one_line(status, err, "error: invalid --settings: metrics.lpf.draws: -1 is less than the minimum of 1")


# ------------------------------------------------------------------------------------------
# Stage command lines.

TRAIN = ("train", "--dataset", "fashion_mnist", "--recipe", "adm")
SAMPLE = ("sample", "--weights", "w.pt", "--dataset", "fashion_mnist", "--steps", "20", "--out", "s.h5")
LPF = ("lpf", "--weights", "w.pt", "--out", "o.h5")


@pytest.mark.parametrize("argv, message", [
    ((*TRAIN, "--steps", "-5"),
     "python -m pipeline train: error: argument --steps: must be a positive integer, got -5"),
    ((*TRAIN, "--steps", "0"), "python -m pipeline train: error: argument --steps: must be a positive integer, got 0"),
    ((*TRAIN, "--seed", "-1"), "python -m pipeline train: error: argument --seed: must be an integer >= 0, got -1"),
    ((*TRAIN, "--stop-after", "0"),
     "python -m pipeline train: error: argument --stop-after: must be a positive integer, got 0"),
    ((*SAMPLE, "--seed", "-1"), "python -m pipeline sample: error: argument --seed: must be an integer >= 0, got -1"),
    ((*LPF, "--seed", "-1"), "python -m pipeline lpf: error: argument --seed: must be an integer >= 0, got -1"),
    ((*LPF, "--draws", "-2"), "python -m pipeline lpf: error: argument --draws: must be a positive integer, got -2"),
    ((*LPF, "--sigma", "nan"), "python -m pipeline lpf: error: argument --sigma: must be a finite number, got nan"),
    ((*TRAIN, "--steps", "ten"), "python -m pipeline train: error: argument --steps: expected an integer, got 'ten'"),
    ((*TRAIN, "--settings", "{"),
     "python -m pipeline train: error: argument --settings/--settings-json: is neither JSON nor a YAML mapping "
     "(expected the node content, but found '<stream end>' at line 1, column 2)"),
    ((*TRAIN, "--settings", ""),
     "python -m pipeline train: error: argument --settings/--settings-json: is empty; pass a mapping such as "
     "'{steps: 10}' or leave the flag out to read the config files"),
    ((*TRAIN, "--settings", "[1]"),
     "python -m pipeline train: error: argument --settings/--settings-json: must be a mapping, got list"),
    ((*TRAIN, "--settings", '{"steps": NaN}'),
     "python -m pipeline train: error: argument --settings/--settings-json: holds NaN; numbers must be finite"),
    ((*TRAIN, "--settings", '{"ema": {"decay": 1e999}}'),
     "python -m pipeline train: error: argument --settings/--settings-json: ema.decay = inf: numbers must be finite; "
     "write a finite value"),
    # The YAML flow mapping the rules pass: the same checks.
    ((*TRAIN, "--settings", "{ema: {decay: .nan}}"),
     "python -m pipeline train: error: argument --settings/--settings-json: ema.decay = nan: numbers must be finite; "
     "write a finite value"),
    ((*TRAIN, "--settings", "{steps: 3, steps: 4}"),
     "python -m pipeline train: error: argument --settings/--settings-json: has a duplicate key 'steps' at line 1 "
     "(first at line 1); give each key once"),
    ((*TRAIN, "--settings", '{"steps": 3, "steps": 4}'),
     "python -m pipeline train: error: argument --settings/--settings-json: has a duplicate key 'steps'; give each "
     "key once"),
])
def test_stage_arguments_refused_in_one_line(capsys, argv, message):
    status, err = run_stage(capsys, *argv)
    assert_one_line(status, err, message + " (see --help)")


def test_path_like_recipe_creates_nothing(tmp_path, capsys, monkeypatch):
    """A recipe name that would climb out of the results tree is refused before any folder exists."""
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path, f"results: {tmp_path / 'results'}\n")
    status, err = run_stage(capsys, "train", "--dataset", "fashion_mnist", "--recipe", "../../x",
                            "--config", str(DEFAULT_CONFIG), "--config", config)
    assert_one_line(status, err, "python -m pipeline train: error: argument --recipe: '../../x' is not a name "
                                 "(a letter, then letters, digits, '_', '.' or '-'); it becomes a folder under the "
                                 "results tree (see --help)")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["my.yaml"]


@pytest.mark.parametrize("text", ["../x", "a/b", "..", ".hidden", "a b"])
def test_path_name_refuses_what_could_leave_a_folder(text):
    with pytest.raises(argparse.ArgumentTypeError):
        arguments.path_name(text)


def test_path_name_takes_the_configs_names():
    config = load_config([DEFAULT_CONFIG, REPO / "config" / "cpu-study.yaml"])
    for name in [*config["recipes"], *config["datasets"]]:
        assert arguments.path_name(name) == name


# ------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("stage", list(STAGES))
def test_help_states_each_default_once(stage):
    parser = build_parser(stage)
    stage_parser = parser._subparsers._group_actions[0].choices[stage]
    text = re.sub(r"\s+", " ", stage_parser.format_help())
    # One chunk per option: from one "  --flag" to the next.
    for chunk in re.split(r" (?=-{1,2}[a-z])", text.split("options:", 1)[1]):
        assert chunk.count("(default") <= 1, chunk
        assert "(default: None)" not in chunk and "(default: False)" not in chunk, chunk


def test_help_exits_0_through_main(capsys):
    assert main(["train", "--help"]) == 0
    assert "--stop-after K" in capsys.readouterr().out


def test_help_shows_defaults_the_text_does_not_state():
    parser = build_parser("train")
    help_text = re.sub(r"\s+", " ", parser._subparsers._group_actions[0].choices["train"].format_help())
    assert "training seed (default: 0)" in help_text
    assert "merged in order over config.yaml" in help_text and "(default: None)" not in help_text


def test_settings_json_returns_the_text_unchanged():
    text = json.dumps({"a": 1, "b": [0.5]})
    assert arguments.settings_json(text) == text


@pytest.mark.parametrize("text, problem", [
    ("a: [1, 2\nb: 3\n", "is not valid YAML: expected ',' or ']', but got ':' at line 2, column 2."),
    ("[1, 2]\n", "must hold a mapping at its top level."),
])
def test_unreadable_config_file_is_one_line(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as caught:
        read_yaml(path)
    assert str(caught.value) == f"config file {path} {problem}"


def test_settings_yaml_flow_round_trips_to_the_same_json():
    """The rules pass settings as a YAML flow mapping (readable in the report); the stage must see
    exactly the values the config resolved to, floats and awkward strings included."""
    import yaml
    from pipeline.arguments import settings_json
    value = {"lr": 1e-08, "rho": 0.05, "big": 1.0e20, "none": None, "flag": True, "steps": [20, 100],
             "path": "it's a; touch {x} #", "looks_numeric": "1e5", "looks_null": "null"}
    flow = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=True).strip()
    assert '"' not in flow and json.loads(settings_json(flow)) == value
