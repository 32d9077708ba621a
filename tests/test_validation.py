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
        "(top level): unknown key(s) trainig; allowed: datasets, device, fid, forward_compile, metrics, quantization, "
        "recipes, report, results, sampling, study, training"]
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
     "training: unknown key(s) optimizr; allowed: checkpoint_every, cuda, diffusion, ema, log_every, "
     "max_expected_days, optimizer, processes, schedule_sampler, steps, swa, threads_per_process"),
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


# ------------------------------------------------------------------------------------------
# Typed stage settings: --settings checked against the stage's type, which the schema checks.

DEMO = REPO / "config" / "demo.yaml"


@pytest.mark.parametrize("argv, expected", [
    ((*TRAIN, "--settings", "{}"),
     "error: --settings lacks dataset, preset, resolution, diffusion, device, seed, batch_size, random_flip, steps, "
     "log_every, checkpoint_every, schedule_sampler, ema, swa, cuda, recipe; pass the whole mapping the Snakemake "
     "rule passes (`snakemake -n -p` prints it), or --configfile instead of --settings."),
    (("report", "--settings", "{}"),
     "error: --settings lacks results, study, report, extractor, n_samples, recipes, averages_from_training; pass "
     "the whole mapping the Snakemake rule passes (`snakemake -n -p` prints it), or --configfile instead of "
     "--settings."),
    (("sample", "--weights", "w.pt", "--dataset", "fashion_mnist", "--steps", "2", "--out", "s.h5",
      "--settings", '{"device": "cpu"}'),
     "error: --settings lacks dataset, preset, resolution, diffusion, n_samples, batch_size, chunk_size, seed; "
     "pass the whole mapping the Snakemake rule passes (`snakemake -n -p` prints it), or --configfile instead of "
     "--settings."),
    ((*TRAIN, "--settings", '{"device": "cpu", "stepz": 3}'),
     "error: --settings: unknown key(s) stepz; TrainSettings takes dataset, preset, resolution, diffusion, device, "
     "seed, batch_size, random_flip, steps, log_every, checkpoint_every, schedule_sampler, ema, swa, cuda, recipe."),
    ((*TRAIN, "--settings", "{}", "--configfile", str(DEMO)),
     "error: pass --settings or --configfile, not both: --settings holds what the config files would resolve to."),
    ((*TRAIN, "--config", "device=cuda"),
     "error: --configfile/--config take YAML files here, not Snakemake's KEY=VALUE (device=cuda); write the values "
     "into an overlay file and pass it with --configfile."),
    ((*TRAIN, "--no-default-config"),
     "error: --no-default-config needs --configfile FILE [FILE ...]: the config to use instead of config.yaml."),
])
def test_incomplete_or_mixed_settings_are_one_line(capsys, argv, expected):
    status, err = run_stage(capsys, *argv)
    assert_one_line(status, err, expected)


def test_settings_values_are_checked_by_the_schema(capsys):
    from pipeline.settings import stage_settings
    settings = stage_settings(load_config([DEFAULT_CONFIG, DEMO]), "sample", dataset="fashion_mnist")
    bad = json.dumps({**settings, "n_samples": 0, "preset": "huge"})
    status, err = run_stage(capsys, "sample", "--weights", "w.pt", "--dataset", "fashion_mnist", "--steps", "2",
                            "--out", "s.h5", "--settings", bad)
    assert_one_line(status, err, "error: invalid --settings: preset: 'huge' is not one of ['cifar10', 'adm64', "
                                 "'demo', 'fmnist16', 'tiny']; n_samples: 0 is less than the minimum of 1")


def test_every_rule_mapping_is_accepted_by_its_stage_type():
    """What the rules pass (stage_settings) passes from_mapping unchanged, for every stage."""
    from pipeline.settings import SETTINGS, stage_settings
    config = load_config([DEFAULT_CONFIG, DEMO])
    wildcards = {"dataset": "fashion_mnist", "recipe": "sam_rho0.01", "seed": 0, "precision": "int8clip"}
    for stage, (kind, _) in SETTINGS.items():
        settings = json.loads(json.dumps(stage_settings(config, stage, **wildcards)))
        assert kind.from_mapping(settings).as_dict() == settings, stage


def _schema_types(node: dict) -> set[str]:
    """The JSON types a schema entry allows, following $ref and allOf."""
    from pipeline.config import schema_document
    while "$ref" in node or "allOf" in node:
        if "$ref" in node:
            node = {**schema_document()["definitions"][node["$ref"].rsplit("/", 1)[1]],
                    **{k: v for k, v in node.items() if k != "$ref"}}
        else:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    kinds = node["type"]
    return {kinds} if isinstance(kinds, str) else set(kinds)


def test_settings_types_agree_with_the_schema():
    """Every field names a schema entry whose JSON type is the field's Python type, and the settings
    that mirror a schema section hold every key of it: a knob added to one is missing from the other."""
    import dataclasses
    from pipeline import settings as s
    python_of = {"integer": {int}, "number": {float}, "boolean": {bool}, "string": {str}, "object": {dict},
                 "array": {list}, "null": {type(None)}}
    checked = 0
    for kind in s.SETTINGS_TYPES:
        for field in dataclasses.fields(kind):
            path = field.metadata["schema"]
            if path is None:
                continue
            allowed = set().union(*(python_of[t] for t in _schema_types(s.schema_node(path))))
            assert set(s.field_types(kind, field.name)) == allowed, (kind.__name__, field.name, path)
            checked += 1
    assert checked > 40

    def keys(path: str) -> set[str]:
        return set(s.schema_node(path)["properties"])

    def fields(kind, prefix: str) -> set[str]:
        return {f.name for f in dataclasses.fields(kind)
                if (f.metadata["schema"] or "").startswith(prefix)}

    assert keys("sampling") == fields(s.SampleSettings, "sampling.")
    # fid.extractor is checked where it is resolved (pipeline.fidelity.extractors knows the names).
    assert keys("fid") == fields(s.FidSettings, "fid.") | {"extractor"}
    assert keys("fid") - set(s.FID_ONLY_KEYS) == fields(s.FidReferenceSettings, "fid.") | {"extractor"}
    assert keys("#dataset") == fields(s.PrepareSettings, "#dataset.")


# ------------------------------------------------------------------------------------------
# One way to pass configs: --configfile A B ... over config.yaml, as Snakemake; --config repeated.

# Each stage's required arguments and the settings key/wildcards its read_settings call uses.
STAGE_CALLS = {
    "prepare": (["--dataset", "fashion_mnist"], "prepare", {"dataset": "fashion_mnist"}),
    "fid-reference": ([], "fid_reference", {}),
    "calibration-samples": (["--data", "d.h5", "--kind", "floor", "--n", "4", "--seed", "0", "--out", "o.h5"],
                            "calibration_floor", {}),
    "train": (["--dataset", "fashion_mnist", "--recipe", "fsgld_adam"], "train",
              {"dataset": "fashion_mnist", "recipe": "fsgld_adam", "seed": 0}),
    "quantize": (["--weights", "w.pt", "--precision", "int8clip", "--out", "q.pt"], "quantize",
                 {"precision": "int8clip"}),
    "sample": (["--weights", "w.pt", "--dataset", "fashion_mnist", "--steps", "2", "--out", "s.h5"], "sample",
               {"dataset": "fashion_mnist"}),
    "fid": (["--samples", "s.h5", "--reference", "r.h5"], "fid", {}),
    "kid-reference": (["--reference", "r.h5"], "kid_reference", {}),
    **{metric: (["--weights", "w.pt", "--out", "m.h5", "--dataset", "fashion_mnist"], metric,
                {"dataset": "fashion_mnist"})
       for metric in ("lpf", "perturbation", "surface", "hessian", "exposure")},
    "report": ([], "report", {}),
}


@pytest.mark.parametrize("stage", [*STAGE_CALLS, "plan"])
def test_every_stage_takes_configfile_over_config_yaml_and_the_repeated_flag(stage):
    from pipeline.settings import config_files, read_settings, stage_settings
    assert set(STAGE_CALLS) | {"plan"} == set(STAGES)
    required, key, wildcards = STAGE_CALLS.get(stage, ([], None, {}))
    parse = build_parser(stage).parse_args
    forms = [["--configfile", str(DEMO)],                                              # Snakemake's form
             ["--configfile", str(DEFAULT_CONFIG), str(DEMO)],                         # config.yaml named too
             ["--config", str(DEFAULT_CONFIG), "--config", str(DEMO)],                 # the older, repeated flag
             ["--configfile", str(DEMO), "--no-default-config"] if key else None]      # the overlay alone
    merged = load_config([DEFAULT_CONFIG, DEMO])
    assert merged["results"] == "results/demo"
    for form in filter(None, forms):
        args = parse([stage, *required, *form])
        files = config_files(args)
        if "--no-default-config" in form:
            assert files == [DEMO]
            continue
        assert load_config(files) == merged, form
        if key is not None:
            settings, config = read_settings(args, key, **wildcards)
            assert config == merged and settings == stage_settings(merged, key, **wildcards), form


def test_a_stage_run_with_the_overlay_alone_sees_it_merged_over_config_yaml(tmp_path, capsys):
    """The report of config/demo.yaml's study: without config.yaml underneath, the overlay lacks
    most sections; merged, the stage looks for the demo's results (and says which are missing)."""
    status, err = run_stage(capsys, "report", "--configfile", str(DEMO), "--out-dir", str(tmp_path / "out"))
    assert status == 2 and err.startswith("error: ") and "results/demo/" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Issue 25, point 8: what used to end in a traceback or the wrong words.

@pytest.mark.parametrize("flag", ["--config", "--configfile"])
def test_non_utf8_config_file_is_one_line(tmp_path, capsys, flag):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("results: r\xe9sultats\n".encode("latin-1"))
    status, err = run_stage(capsys, *TRAIN, flag, str(bad))
    assert_one_line(status, err, f"error: config file {bad} is not UTF-8 text (byte 10 cannot be decoded); "
                                 f"save it as UTF-8.")


def test_null_recipe_is_a_plain_recipe_not_sam_and_fsgld():
    config = deep_merge(load_config([DEFAULT_CONFIG]), {"recipes": {"adm": None}})
    from pipeline.config import validation_problems
    assert validation_problems(config) == []
    both = deep_merge(config, {"recipes": {"adm": {"sam": {"rho": 0.1}, "fsgld": {}}}})
    assert validation_problems(both) == ["recipes.adm: may not hold sam and fsgld together"]


# ------------------------------------------------------------------------------------------
# Issue 25, point 5: an absurd size is said before any job, with the key that silences it.

def test_absurd_training_size_warns_in_one_line_and_a_key_silences_it():
    from pipeline.settings import size_warnings
    config = load_config([DEFAULT_CONFIG])
    assert size_warnings(config) == [] and size_warnings(load_config([DEFAULT_CONFIG, DEMO])) == []
    config["training"]["steps"] = 10_000_000
    (line,) = size_warnings(config)
    assert line.startswith("training lsun_tower/sam_rho0.1 (and 18 more run(s)): 10000000 steps at batch 256 on "
                           "preset adm64 would take about ")
    assert line.endswith(" days at a default 3e+13 FLOP/s on cuda, beyond training.max_expected_days = 30; lower "
                         "training.steps, or set training.max_expected_days (null silences this).")
    days = float(line.split("about ")[1].split(" days")[0].replace(",", ""))
    assert 300 < days < 3000
    # Ten times fewer steps, ten times fewer days.
    config["training"]["steps"] = 1_000_000
    fewer = float(size_warnings(config)[0].split("about ")[1].split(" days")[0].replace(",", ""))
    assert abs(fewer - days / 10) <= 1
    config["training"]["max_expected_days"] = None
    assert size_warnings(config) == []


def test_flop_estimate_matches_the_demo_presets_measured_count():
    """preset_table.py: the demo preset costs 34 GFLOP per training step at batch 32."""
    from pipeline.settings import training_flops_per_image
    assert 0.8 < training_flops_per_image("demo") * 32 / 34e9 < 1.2


def test_planning_prints_the_size_warning_before_any_job(tmp_path):
    demo = DEMO.read_text()
    result = plan(tmp_path, demo, "training: {steps: 10000000, max_expected_days: 1}\n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning: training ")]
    assert len(warnings) == 1 and "fashion_mnist/sam_rho0.01" in warnings[0] and "on cpu" in warnings[0]
