"""Resolved settings of each stage: typed, built and checked once from the merged config.

Each stage's settings are one dataclass below. A field's metadata names the key of the config
schema (workflow/schemas/config.schema.yaml) it comes from, and that schema entry is what checks
the value: types, ranges and enums are written once, in the schema, and a test checks that every
field's Python type agrees with it. The Snakefile passes `stage_settings(...)` to each job (as a
YAML flow mapping), so Snakemake's params trigger reruns exactly when a job's own settings
change: editing SAM's rho changes only the SAM runs' settings. A stage run by hand with
--configfile builds the same mapping from the merged files; either way it enters through
`read_settings`, the one door. No torch import here, so the Snakefile stays quick to parse.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from pipeline.config import (DEFAULT_CONFIG, load_config, read_yaml, schema_document, section,
                             validation_problems)
from pipeline.errors import PipelineError
from pipeline.nn.preset_table import PRESET_TABLE
from pipeline.precision import CLIP, parse_precision, precision_scheme
from pipeline.recipes import Recipe, resolve_recipe

MISSING = dataclasses.MISSING
# The average name of the raw (unaveraged) weights.
RAW = "none"
# The measures whose forwards forward_compile may compile (pipeline.nn.forward_compile).
COMPILED_METRICS = ("lpf", "perturbation", "surface", "exposure")


class _Omitted:
    """The value of an optional key the config leaves out: absent from the settings mapping too."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Any = _Omitted()


def setting(schema: str | None, default: Any = MISSING) -> Any:
    """A settings field checked against the schema entry at `schema` (None: by its Python type).

    `schema` walks the schema's `properties` ("training.steps"), or starts at its `definitions`
    with a '#' ("#dataset.preset").
    """
    return dataclasses.field(default=default, metadata={"schema": schema})


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Base of every stage's settings: `from_mapping` is the one check of a mapping's keys and values."""

    # Config-shaped slices (a stage that reads config sections as they are) are checked by the whole schema.
    CONFIG_SHAPED: ClassVar[bool] = False

    @classmethod
    def from_mapping(cls, value: Any, source: str = "--settings") -> "StageSettings":
        """Check keys (none unknown, none missing) and every value, then build; one line per refusal."""
        if not isinstance(value, Mapping):
            raise PipelineError(f"{source} must be a mapping, got {type(value).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise PipelineError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; "
                                f"{cls.__name__} takes {', '.join(fields)}.")
        missing = [name for name, f in fields.items() if name not in value and f.default is MISSING]
        if missing:
            raise PipelineError(f"{source} lacks {', '.join(missing)}; pass the whole mapping the Snakemake rule "
                                f"passes (`snakemake -n -p` prints it), or --configfile instead of --settings.")
        problems = (validation_problems(dict(value), complete=False) if cls.CONFIG_SHAPED else
                    [p for name, f in fields.items() if name in value for p in field_problems(cls, f, value[name])])
        if problems:
            raise PipelineError(f"invalid {source}: " + "; ".join(problems))
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """The mapping a rule passes (optional keys the config left out stay out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not OMITTED}


# ------------------------------------------------------------------------------------------
# Checking one field against its schema entry.

def schema_node(path: str) -> dict[str, Any]:
    """The schema entry a field names: "sampling.n_samples" or "#dataset.preset"."""
    node: Any = schema_document()
    keys = path.split(".")
    if keys[0].startswith("#"):
        node, keys = node["definitions"][keys[0][1:]], keys[1:]
    for key in keys:
        node = node["properties"][key]
    return node


@functools.lru_cache(maxsize=None)
def _field_validator(path: str):
    import jsonschema  # 0.15 s to import: paid only when settings are checked

    root = schema_document()
    # The entry's $refs ("#/definitions/...") resolve against this document, so it carries them.
    schema = {"$schema": root["$schema"], "definitions": root["definitions"], **schema_node(path)}
    return jsonschema.validators.validator_for(schema)(schema)


def field_problems(cls: type, field: dataclasses.Field, value: Any) -> list[str]:
    """What is wrong with one field's value, as lines naming the key."""
    path = field.metadata.get("schema")
    if path is not None:
        return [f"{'.'.join(map(str, [field.name, *error.absolute_path]))}: {error.message}"
                for error in _field_validator(path).iter_errors(value)]
    allowed = field_types(cls, field.name)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        return [f"{field.name}: {value!r} is not of type {field.type}"]
    return []


def field_types(cls: type, name: str) -> tuple[type, ...]:
    """The Python types a field's annotation allows (each member of a union; dict for dict[str, Any])."""
    hint = _type_hints(cls)[name]
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(m) or m for m in members)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ------------------------------------------------------------------------------------------
# The settings of each stage.

@dataclasses.dataclass(frozen=True)
class ModelSettings(StageSettings):
    """What rebuilds a dataset's network and diffusion from a weights file."""

    dataset: str = setting(None)
    preset: str = setting("#dataset.preset")
    resolution: int = setting("#dataset.resolution")
    diffusion: dict[str, Any] = setting("training.diffusion")
    device: str = setting("device")


@dataclasses.dataclass(frozen=True)
class TrainSettings(ModelSettings):
    """One training run."""

    seed: int = setting("#seed")
    batch_size: int = setting("#dataset.batch_size")
    random_flip: bool = setting("#dataset.random_flip")
    steps: int = setting("training.steps")
    log_every: int = setting("training.log_every")
    checkpoint_every: int = setting("training.checkpoint_every")
    schedule_sampler: str = setting("training.schedule_sampler")
    ema: dict[str, Any] = setting("training.ema")
    swa: dict[str, Any] = setting("training.swa")
    cuda: dict[str, Any] = setting("training.cuda")
    recipe: dict[str, Any] = setting(None)  # Recipe.describe(), checked by resolve_recipe when built


@dataclasses.dataclass(frozen=True)
class SampleSettings(ModelSettings):
    """Sampling one weights file: the network plus config `sampling`."""

    n_samples: int = setting("sampling.n_samples")
    batch_size: int = setting("sampling.batch_size")
    chunk_size: int = setting("sampling.chunk_size")
    seed: int = setting("sampling.seed")
    # A mapping given by hand may leave it out: the forward then runs eager (compiling is an optimisation).
    forward_compile: dict[str, Any] = setting("forward_compile", OMITTED)


def _json_types(node: Mapping[str, Any]) -> set[str]:
    """The JSON types a schema entry allows, through $ref and allOf."""
    while "$ref" in node or "allOf" in node:
        if "$ref" in node:
            target = schema_document()["definitions"][node["$ref"].rsplit("/", 1)[1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        else:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    kinds = node["type"]
    return {kinds} if isinstance(kinds, str) else set(kinds)


_PYTHON_TYPE = {"integer": int, "number": float, "boolean": bool, "string": str, "object": dict, "array": list,
                "null": type(None)}


def _settings_from_schema(name: str, path: str, leading: Sequence[tuple[str, type]], doc: str) -> type:
    """A settings dataclass whose fields are the schema entry's keys (required ones first), so the
    two cannot disagree; `leading`: fields of the stage's own before them (not in the entry)."""
    entry = schema_node(path)
    required = set(entry.get("required", []))
    fields = [(key, kind, setting(None)) for key, kind in leading]
    for key in sorted(entry["properties"], key=lambda k: k not in required):
        kind = functools.reduce(operator.or_, sorted((_PYTHON_TYPE[t] for t in
                                                      _json_types(entry["properties"][key])), key=str))
        fields.append((key, kind, setting(f"{path}.{key}", MISSING if key in required else OMITTED)))
    cls = dataclasses.make_dataclass(name, fields, bases=(StageSettings,), frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


# One dataset's entry under `datasets:` with its name: whatever keys the schema gives an entry.
PrepareSettings = _settings_from_schema("PrepareSettings", "#dataset", [("dataset", str)],
                                        "One dataset's entry under `datasets:`, with its name.")


@dataclasses.dataclass(frozen=True)
class CalibrationSettings(StageSettings):
    """Calibration samples: N and seed as the models' samples; the floor also avoids the reference's subset.

    The stage's --n and --seed decide (the rule passes the same values): every key is optional.
    """

    n: int = setting("sampling.n_samples", OMITTED)
    seed: int = setting("sampling.seed", OMITTED)
    reference_images: int | None = setting("fid.reference_images", OMITTED)


@dataclasses.dataclass(frozen=True)
class FidReferenceSettings(StageSettings):
    """Config `fid:` without FID_ONLY_KEYS (the bootstrap, the subset KID: fid-stage work that must not
    recompute the reference).

    Every key is optional: the stage falls back on its flags, then on built-in defaults.
    """

    extractor: str = setting(None, OMITTED)  # resolve_extractor knows the names (tests register more)
    inception_weights: str | None = setting("fid.inception_weights", OMITTED)
    reference_images: int | None = setting("fid.reference_images", OMITTED)
    batch_size: int = setting("fid.batch_size", OMITTED)
    kid_rows: int = setting("fid.kid_rows", OMITTED)


# Keys of config `fid:` that only the fid stage reads: editing them must not recompute a reference.
FID_ONLY_KEYS = ("bootstrap", "kid_subsets", "kid_subset_size")


@dataclasses.dataclass(frozen=True)
class FidSettings(FidReferenceSettings):
    """Config `fid:`."""

    kid_subsets: int = setting("fid.kid_subsets", OMITTED)
    kid_subset_size: int = setting("fid.kid_subset_size", OMITTED)
    bootstrap: dict[str, Any] = setting("fid.bootstrap", OMITTED)


@dataclasses.dataclass(frozen=True)
class KidReferenceSettings(StageSettings):
    """Config `fid.bootstrap`: the replicates and seed whose reference KID terms kid-reference computes."""

    bootstrap: dict[str, Any] = setting("fid.bootstrap", OMITTED)


@dataclasses.dataclass(frozen=True)
class QuantizeSettings(StageSettings):
    """A config slice: quantization.clip for the clip-and-round precisions, nothing for min-max."""

    CONFIG_SHAPED: ClassVar[bool] = True
    quantization: dict[str, Any] = setting("quantization", OMITTED)


@dataclasses.dataclass(frozen=True)
class MetricSettings(StageSettings):
    """A config slice read like a merged config file: the device, the preset, the diffusion, metrics.<name>.

    Every section is optional: the stage's flags and built-in defaults fill what is left out.
    """

    CONFIG_SHAPED: ClassVar[bool] = True
    device: str = setting("device", OMITTED)
    datasets: dict[str, Any] = setting("datasets", OMITTED)
    training: dict[str, Any] = setting("training", OMITTED)
    metrics: dict[str, Any] = setting("metrics", OMITTED)
    forward_compile: dict[str, Any] = setting("forward_compile", OMITTED)


@dataclasses.dataclass(frozen=True)
class ReportSettings(StageSettings):
    """The study, the report's options and what the report reads from other sections."""

    results: str = setting("results")
    study: dict[str, Any] = setting("study")
    report: dict[str, Any] = setting("report")
    extractor: str = setting("fid.extractor")
    n_samples: int = setting("sampling.n_samples")  # N of the calibration rows' file names
    recipes: dict[str, Any] = setting(None)  # name -> Recipe.describe()
    averages_from_training: dict[str, Any] = setting(None)


# ------------------------------------------------------------------------------------------
# Building each stage's settings from a merged config.

def _model(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    data = section(config, "datasets", dataset)
    return {"dataset": dataset, "preset": data["preset"], "resolution": int(data["resolution"]),
            "diffusion": dict(section(config, "training", "diffusion")),
            "device": config.get("device", "auto")}


def _train(config: Mapping[str, Any], dataset: str, recipe: str, seed: int) -> TrainSettings:
    data = section(config, "datasets", dataset)
    training = section(config, "training")
    return TrainSettings(
        **_model(config, dataset),
        seed=int(seed),
        batch_size=int(data["batch_size"]),
        random_flip=bool(data["random_flip"]),
        steps=int(training["steps"]),
        log_every=int(training["log_every"]),
        checkpoint_every=int(training["checkpoint_every"]),
        schedule_sampler=training["schedule_sampler"],
        ema=dict(training["ema"]),
        swa=dict(training["swa"]),
        cuda=dict(training.get("cuda", {})),
        recipe=resolve_recipe(config, recipe).describe(),
    )


def _sample(config: Mapping[str, Any], dataset: str) -> SampleSettings:
    return SampleSettings(**_model(config, dataset), **dict(section(config, "sampling")),
                          forward_compile=dict(section(config, "forward_compile")))


def _prepare(config: Mapping[str, Any], dataset: str) -> PrepareSettings:
    entry = {"dataset": dataset, **dict(section(config, "datasets", dataset))}
    return PrepareSettings.from_mapping(entry, source=f"datasets.{dataset}")


def _calibration(config: Mapping[str, Any], kind: str) -> CalibrationSettings:
    # Noise depends on N and the seed only; the floor of a dataset without a test split avoids
    # the reference's subset.
    sampling = section(config, "sampling")
    reference = section(config, "fid")["reference_images"] if kind == "floor" else OMITTED
    return CalibrationSettings(n=sampling["n_samples"], seed=sampling["seed"], reference_images=reference)


def _fid(config: Mapping[str, Any]) -> FidSettings:
    return FidSettings(**dict(section(config, "fid")))


def _fid_reference(config: Mapping[str, Any]) -> FidReferenceSettings:
    return FidReferenceSettings(**{k: v for k, v in section(config, "fid").items() if k not in FID_ONLY_KEYS})


def _kid_reference(config: Mapping[str, Any]) -> KidReferenceSettings:
    bootstrap = section(config, "fid").get("bootstrap")
    return KidReferenceSettings() if bootstrap is None else KidReferenceSettings(bootstrap=bootstrap)


def _quantize(config: Mapping[str, Any], precision: str) -> QuantizeSettings:
    # Only clip-and-round reads the config: a clip edit reruns the intBclip jobs and leaves the
    # min-max ones (and their samples) alone.
    if precision_scheme(parse_precision(precision)) == CLIP:
        return QuantizeSettings(quantization={"clip": float(section(config, "quantization", "clip"))})
    return QuantizeSettings()


def _metric(config: Mapping[str, Any], metric: str, dataset: str | None) -> MetricSettings:
    # By hand the network may come from --preset or train.h5 instead of a dataset's entry (the
    # stage says so when it needs the entry and finds none).
    known = dataset is not None and dataset in (config.get("datasets") or {})
    datasets = {dataset: {"preset": section(config, "datasets", dataset, "preset")}} if known else OMITTED
    # The Hessian never compiles (double backward), so forward_compile edits leave its jobs alone.
    compiled = (dict(section(config, "forward_compile")) if metric in COMPILED_METRICS else OMITTED)
    return MetricSettings(device=config.get("device", "auto"), datasets=datasets,
                          training={"diffusion": dict(section(config, "training", "diffusion"))},
                          metrics={metric: dict(section(config, "metrics", metric))},
                          forward_compile=compiled)


def _report(config: Mapping[str, Any]) -> ReportSettings:
    study = section(config, "study")
    return ReportSettings(
        results=config["results"], study=dict(study), report=dict(section(config, "report")),
        extractor=section(config, "fid", "extractor"), n_samples=section(config, "sampling", "n_samples"),
        recipes={name: resolve_recipe(config, name).describe() for name in study_recipes(study)},
        averages_from_training={"ema_decay": section(config, "training", "ema", "decay"),
                                "swa": dict(section(config, "training", "swa"))})


METRICS = ("lpf", "perturbation", "surface", "hessian", "exposure")

# Stage -> (its settings type, how the config builds them from the job's wildcards).
SETTINGS: dict[str, tuple[type[StageSettings], Callable[..., StageSettings]]] = {
    "prepare": (PrepareSettings, lambda config, dataset, **_: _prepare(config, dataset)),
    "fid_reference": (FidReferenceSettings, lambda config, **_: _fid_reference(config)),
    "kid_reference": (KidReferenceSettings, lambda config, **_: _kid_reference(config)),
    "calibration_floor": (CalibrationSettings, lambda config, **_: _calibration(config, "floor")),
    "calibration_static": (CalibrationSettings, lambda config, **_: _calibration(config, "static")),
    "train": (TrainSettings, lambda config, dataset, recipe, seed, **_: _train(config, dataset, recipe, seed)),
    "quantize": (QuantizeSettings, lambda config, precision, **_: _quantize(config, precision)),
    "sample": (SampleSettings, lambda config, dataset, **_: _sample(config, dataset)),
    "fid": (FidSettings, lambda config, **_: _fid(config)),
    **{metric: (MetricSettings, functools.partial(lambda config, dataset, metric, **_: _metric(config, metric, dataset),
                                                  metric=metric))
       for metric in METRICS},
    "report": (ReportSettings, lambda config, **_: _report(config)),
}
SETTINGS_TYPES = tuple(dict.fromkeys(kind for kind, _ in SETTINGS.values()))


def stage_settings(config: Mapping[str, Any], stage: str, **wildcards: Any) -> dict[str, Any]:
    """The config slice a stage depends on (and nothing more, so unrelated edits rerun nothing).

    `wildcards`: what the stage's settings depend on besides the config: dataset (prepare,
    sample, metrics), precision (quantize), dataset, recipe and seed (train).
    """
    if stage not in SETTINGS:
        raise ValueError(f"no settings for stage {stage!r}")
    return SETTINGS[stage][1](config, **wildcards).as_dict()


def model_settings(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """What is needed to rebuild a dataset's network and diffusion from a weights file."""
    return _model(config, dataset)


def train_settings(config: Mapping[str, Any], dataset: str, recipe: str, seed: int) -> dict[str, Any]:
    """The resolved settings of one training run."""
    return _train(config, dataset, recipe, seed).as_dict()


def read_settings(args: Any, stage: str, **wildcards: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The one way into a stage: its settings and the merged config (None under --settings).

    --settings (what the Snakemake rule passes) is checked against the stage's type; otherwise
    the --configfile files (config.yaml first, unless --no-default-config) are merged,
    validated, and the settings built from them exactly as the rule would have.
    """
    kind, build = SETTINGS[stage]
    if args.settings_json is not None:
        if getattr(args, "configfiles", None) or getattr(args, "no_default_config", False):
            raise PipelineError("pass --settings or --configfile, not both: --settings holds what the config "
                                "files would resolve to.")
        return kind.from_mapping(json.loads(args.settings_json)).as_dict(), None
    config = load_config(config_files(args))
    return build(config, **wildcards).as_dict(), config


def config_files(args: Any) -> list[Path]:
    """The config files a stage merges: config.yaml, then --configfile's, as Snakemake merges them.

    config.yaml is left out under --no-default-config, or when the list already starts with it.
    """
    given = [Path(p) for p in (getattr(args, "configfiles", None) or [])]
    for path in given:
        if "=" in path.name and not path.exists():
            raise PipelineError(f"--configfile/--config take YAML files here, not Snakemake's KEY=VALUE ({path}); "
                                f"write the values into an overlay file and pass it with --configfile.")
    if getattr(args, "no_default_config", False):
        if not given:
            raise PipelineError("--no-default-config needs --configfile FILE [FILE ...]: the config to use "
                                "instead of config.yaml.")
        return given
    if given and given[0].resolve() == DEFAULT_CONFIG.resolve():
        return given
    return [DEFAULT_CONFIG, *given]


def study_precisions(study: Mapping[str, Any], average: str) -> list[str]:
    """The precisions evaluated for one average: study.precisions, then its extra_precisions."""
    extra = (study.get("extra_precisions") or {}).get(average, [])
    return list(study["precisions"]) + [p for p in extra if p not in study["precisions"]]


def study_steps(study: Mapping[str, Any], precision: str) -> list[int]:
    """The T' a precision is sampled at: every sampling step for fp32, quantized_steps otherwise."""
    steps = [int(s) for s in study["sampling_steps"]]
    if precision == "fp32" or study.get("quantized_steps") is None:
        return steps
    return [int(s) for s in study["quantized_steps"]]


def metric_averages(study: Mapping[str, Any], metric: str) -> list[str]:
    """The averages a metric is measured on: study.metric_averages[metric], else every average."""
    chosen = (study.get("metric_averages") or {}).get(metric)
    return [a for a in study["averages"] if chosen is None or a in chosen]


def study_variants(study: Mapping[str, Any], raw_only: bool = False) -> list[tuple[str, str, int]]:
    """Every (average, precision, T') a training run of the study is sampled and scored at
    (raw_only: those of the raw weights, as for the runs of study.extra_seeds)."""
    return [(average, precision, steps)
            for average in study["averages"] if not raw_only or average == RAW
            for precision in study_precisions(study, average)
            for steps in study_steps(study, precision)]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study; raw_only: scored on its raw weights only (study.extra_seeds)."""

    recipe: str
    seed: int
    raw_only: bool


def study_runs(study: Mapping[str, Any]) -> list[Run]:
    """Every training run of the study, recipe by recipe (study.recipes, then those only in
    study.extra_seeds), seeds ascending: study.recipes x study.seeds are scored at every variant,
    study.extra_seeds adds runs scored on their raw weights only (a seed in both is a full run)."""
    extra = study.get("extra_seeds") or {}
    runs = []
    for recipe in study_recipes(study):
        full = set(int(s) for s in study["seeds"]) if recipe in study["recipes"] else set()
        for seed in sorted(full | set(int(s) for s in extra.get(recipe, []))):
            runs.append(Run(recipe, seed, seed not in full))
    return runs


def study_recipes(study: Mapping[str, Any]) -> list[str]:
    """study.recipes, then the recipes named only in study.extra_seeds (with one seed or more), in the config's
    order: an overlay empties another's entry with `recipe: []`."""
    extra = [r for r, seeds in (study.get("extra_seeds") or {}).items() if seeds and r not in study["recipes"]]
    return list(study["recipes"]) + extra


def study_seeds(study: Mapping[str, Any]) -> list[int]:
    """Every training seed of the study (study.seeds and study.extra_seeds), ascending."""
    seeds = set(int(s) for s in study["seeds"])
    for extra in (study.get("extra_seeds") or {}).values():
        seeds.update(int(s) for s in extra)
    return sorted(seeds)


# ------------------------------------------------------------------------------------------
# Absurd sizes: a rough price of each training run, without a calibration.

# Sustained training throughput assumed per device when nothing was measured (FLOP/s, as
# training_flops_per_image counts them): a few CPU cores; one H200 in the pipeline's deterministic
# fp32, where cifar10 trained at 417 images/s (24 TFLOP/s) and adm64 at 55 (35 TFLOP/s; README,
# "Measured on an NVIDIA H200"). `device: auto` is priced as cuda, the faster, so a warning means
# the run is too long even there.
DEFAULT_FLOPS_PER_SECOND = {"cpu": 1.0e11, "cuda": 3.0e13}
# Days past which a training run is called absurd: the estimate is rough (a factor of 2 either
# way), so well beyond the train rule's 7-day runtime resource.
DEFAULT_MAX_EXPECTED_DAYS = 30.0
# The residual blocks' convolutions leave out the decoder's wider (concatenated) inputs,
# attention and normalization: the demo preset measures 34 GFLOP per step at batch 32 where the
# convolutions alone count 16.
UNCOUNTED_FACTOR = 2.0


def training_flops_per_image(preset: str) -> float:
    """FLOPs of one training image (forward and backward) through a preset's UNet, roughly.

    Each level of resolution r and width c has num_res_blocks residual blocks going down and
    num_res_blocks + 1 coming up, each two 3x3 convolutions: 2 x 9 c^2 r^2 multiply-adds; the
    backward pass costs twice the forward.
    """
    table = PRESET_TABLE[preset]
    blocks = 2 * table["num_res_blocks"] + 1
    macs = sum(blocks * 2 * 9 * (table["model_channels"] * mult) ** 2 * (table["image_size"] // 2 ** level) ** 2
               for level, mult in enumerate(table["channel_mult"]))
    return 3 * 2 * macs * UNCOUNTED_FACTOR


def gradient_passes(recipe: Recipe) -> int:
    """Forward-backward passes of one step: SAM adds its ascent pass, fSGLD takes n_pert draws."""
    if recipe.sam is not None:
        return 2
    if recipe.fsgld is not None:
        return int(recipe.fsgld["n_pert"])
    return 1


def size_warnings(config: Mapping[str, Any]) -> list[str]:
    """One line when the longest training run of the study is absurd for its resources (else none).

    Steps x batch x FLOPs per image x passes, priced at DEFAULT_FLOPS_PER_SECOND for the config's
    device over training.processes, against training.max_expected_days (null: never warn).
    """
    limit = config["training"].get("max_expected_days", DEFAULT_MAX_EXPECTED_DAYS)
    if limit is None:
        return []
    device = "cpu" if config["device"] == "cpu" else "cuda"
    rate = DEFAULT_FLOPS_PER_SECOND[device] * config["training"].get("processes", 1)
    steps = config["training"]["steps"]
    runs = []
    for dataset in config["study"]["datasets"]:
        entry = config["datasets"][dataset]
        for name in config["study"]["recipes"]:
            flops = (steps * entry["batch_size"] * training_flops_per_image(entry["preset"])
                     * gradient_passes(resolve_recipe(config, name)))
            runs.append((flops / rate / 86400, f"{dataset}/{name}", entry["batch_size"], entry["preset"]))
    too_long = sorted((run for run in runs if run[0] > limit), reverse=True)
    if not too_long:
        return []
    days, run, batch, preset = too_long[0]
    others = f" (and {len(too_long) - 1} more run(s))" if len(too_long) > 1 else ""
    return [f"training {run}{others}: {steps} steps at batch {batch} on preset {preset} would take about "
            f"{days:,.0f} days at a default {DEFAULT_FLOPS_PER_SECOND[device]:.0e} FLOP/s on {device}, beyond "
            f"training.max_expected_days = {limit:g}; lower training.steps, or set training.max_expected_days "
            f"(null silences this)."]


def planning_problems(config: Mapping[str, Any], configfiles: Sequence[str | Path]) -> list[str]:
    """Everything checked before Snakemake plans a job, one line per problem.

    `configfiles`: the files Snakemake merged (workflow.configfiles), re-read with the loader
    that refuses duplicate keys. Cross-checks run only on a schema-valid config (they rely on
    its shape).
    """
    problems = []
    for path in configfiles:
        try:
            read_yaml(path)
        except PipelineError as err:
            problems.append(str(err))
    problems += validation_problems(config, complete=True)
    return problems or config_problems(config)


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What a JSON schema cannot check: cross references, paths on disk, step counts."""
    problems = []
    # Any other character is safe: the rules quote every path in their shell commands.
    if "{" in config["results"] or "}" in config["results"]:
        problems.append(f"results = {config['results']!r}: Snakemake reads braces in a path as wildcards; "
                        f"name a folder without {{ }}")
    study = config["study"]
    for name in study["datasets"]:
        if name not in config["datasets"]:
            problems.append(f"study.datasets names '{name}', which has no entry under datasets:")
            continue
        source = config["datasets"][name]["source"]
        if source is not None and not Path(source).exists():
            problems.append(f"datasets.{name}.source = {source} does not exist; point it at the "
                            f"raw data or set it to null for the default location.")
        preset, resolution = config["datasets"][name]["preset"], config["datasets"][name]["resolution"]
        if PRESET_TABLE[preset]["image_size"] != resolution:
            problems.append(f"datasets.{name}: preset {preset} is built for {PRESET_TABLE[preset]['image_size']}px "
                            f"images but resolution is {resolution}; pick a preset of that size or change it.")
        processes = config["training"].get("processes", 1)
        if config["datasets"][name]["batch_size"] % processes:
            problems.append(f"datasets.{name}.batch_size = {config['datasets'][name]['batch_size']} is not a "
                            f"multiple of training.processes = {processes}; each process takes an equal share.")
    training = config["training"]
    if round(training["swa"]["start_fraction"] * training["steps"]) < 1:
        problems.append(f"training.swa.start_fraction = {training['swa']['start_fraction']} of {training['steps']} "
                        f"steps starts SWA at step 0, averaging in the untrained weights; raise either.")
    for name in study_recipes(study):
        try:
            resolve_recipe(config, name)
        except PipelineError as err:
            problems.append(str(err))
    if study.get("extra_seeds") and RAW not in study["averages"]:
        problems.append(f"study.extra_seeds adds runs scored on their raw weights, but study.averages "
                        f"{study['averages']} leaves out the raw weights (none); add none or drop extra_seeds.")
    for average in study.get("extra_precisions") or {}:
        if average not in study["averages"]:
            problems.append(f"study.extra_precisions names average '{average}', which is not in study.averages "
                            f"{study['averages']}.")
    for metric, averages in (study.get("metric_averages") or {}).items():
        unknown = sorted(set(averages) - set(study["averages"]))
        if unknown:
            problems.append(f"study.metric_averages.{metric} names {unknown}, not in study.averages {study['averages']}.")
    control = config["report"]["negative_control"]
    if control["seeds"] and control["recipe"] not in study_recipes(study):
        problems.append(f"report.negative_control.recipe = {control['recipe']} is not in study.recipes; name a "
                        f"recipe of the study or set report.negative_control.seeds to [].")
    overlap = sorted(set(control["seeds"]) & set(study_seeds(study)))
    if overlap:
        problems.append(f"report.negative_control.seeds {overlap} are also study seeds; the control needs runs "
                        f"the study does not have (e.g. 100, 101, ...).")
    stray = sorted(set(study.get("quantized_steps") or []) - set(study["sampling_steps"]))
    if stray:
        problems.append(f"study.quantized_steps {stray} are not in study.sampling_steps {study['sampling_steps']}; "
                        f"quantized variants are sampled at a subset of those T'.")
    diffusion_steps = config["training"]["diffusion"]["steps"]
    for key, steps in (("study.sampling_steps", study["sampling_steps"]),
                       ("metrics.exposure.steps", config["metrics"]["exposure"].get("steps", []))):
        too_many = [s for s in steps if s > diffusion_steps]
        if too_many:
            problems.append(f"{key} {too_many} exceed the {diffusion_steps} diffusion steps the "
                            f"models are trained with (training.diffusion.steps); T' must be <= that.")
    weights = config["fid"]["inception_weights"]
    if weights is not None and not Path(weights).is_file():
        problems.append(f"fid.inception_weights = {weights} is not a file.")
    selection = config["report"]["sam_selection"]
    sam_recipes = [r for r in study_recipes(study) if (config["recipes"].get(r) or {}).get("sam") is not None]
    if selection.startswith("best_fid_") and int(selection.removeprefix("best_fid_")) not in study["sampling_steps"]:
        problems.append(f"report.sam_selection = {selection}, but T' = {selection.removeprefix('best_fid_')} "
                        f"is not in study.sampling_steps {study['sampling_steps']}.")
    if selection.startswith("rho="):
        rho = float(selection.removeprefix("rho="))
        if not any(float(config["recipes"][r]["sam"]["rho"]) == rho for r in sam_recipes):
            problems.append(f"report.sam_selection = {selection}, but no recipe of the study uses that rho.")
    return problems
