"""The report built from a small fixture of input files, checked cell by cell and verdict by verdict.

The fixture is a micro study (one dataset; recipes adm, sam_rho0.1, sam_rho0.01, fsgld_adam;
averages none/ema/swa; fp32/int8; T' 20/100). Its files are written with the real writers where
they can run without a model (metric_common.write_results, train.write_train_log, provenance) and
with the fid and sample stages' exact keys and attributes otherwise; every number is a known
function of (recipe, average, precision, T', seed): values, bootstrap replicates (a shared offset
pattern scaled per model), LPF draws, and the selection samples that choose SAM's rho. Expected
cells and intervals are computed here with the percentile and Student-t formulas, never with
pipeline.stats. A last test runs the real metric stages on a tiny UNet and reads their files with
the report's readers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.io.integrity import save_torch, seal_h5
from pipeline import layout
from pipeline.cli import main as cli_main
from pipeline.config import DEFAULT_CONFIG, deep_merge, load_config
from pipeline.errors import PipelineError
from pipeline.flatness.exposure import GAP_CONVENTION
from pipeline.flatness.model_setup import ModelSettings
from pipeline.io import provenance, write_attrs
from pipeline.report import build_report
from pipeline.report.claims import claims_frame, claims_table, control_failures
from pipeline.report.collect import METRIC_ROWS, collect, read_exposure_curves, read_perturbation
from pipeline.report.power import power_table
from pipeline.report.render import Table, latex_escape, to_latex, to_markdown
from pipeline.report.study import Study, algorithm_label, select_sam
from pipeline.report.tables import fixed, significant, table1, table2, table3
from pipeline.study_files import report_inputs
from pipeline.settings import config_problems, stage_settings, study_runs, train_settings
from pipeline.stats.power import minimum_detectable_effect, seeds_needed
from pipeline.stages import exposure as exposure_stage
from pipeline.stages import hessian as hessian_stage
from pipeline.stages import lpf as lpf_stage
from pipeline.stages import perturbation as perturbation_stage
from pipeline.stages import surface as surface_stage
from pipeline.stages.metric_common import MeasureContext, write_results
from pipeline.stages.train import write_train_log

RECIPES = ["adm", "sam_rho0.1", "sam_rho0.01", "fsgld_adam"]
AVERAGES = ["none", "ema", "swa"]
STEPS = [20, 100]

# The fixture's numbers. FID-like value = base / (T' / 20) + average offset + int8 damage + seed shift.
FID_BASE = {"adm": 30.0, "sam_rho0.1": 12.0, "sam_rho0.01": 9.0, "fsgld_adam": 20.0}
AVERAGE_OFFSET = {"none": 0.0, "ema": -2.0, "swa": -1.0}
INT8_DAMAGE = {"adm": 10.0, "sam_rho0.1": 0.5, "sam_rho0.01": 0.5, "fsgld_adam": 3.0}
# Per-seed shift shared by every recipe. The negative control's runs (seeds 100-103, paired with 0-3)
# differ from their partners by noise only (+1, -1, -1, +1), so the control has no trend to find.
SEED_SHIFT = {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0, 100: 1.0, 101: 0.0, 102: 0.0, 103: 1.0}
# Selection samples (report.selection) at T'=20: they choose rho 0.1, while the main samples
# (12 vs 9 above) would choose rho 0.01, so a report that used the main samples would show it.
VALIDATION_FID = {"sam_rho0.1": 10.0, "sam_rho0.01": 14.0}
LPF = {"adm": 0.097, "sam_rho0.1": 0.050, "sam_rho0.01": 0.063, "fsgld_adam": 0.090}
LPF_AVERAGE_OFFSET = {"none": 0.0, "ema": 0.002, "swa": 0.002}
FILTER_FACTOR = 2.0  # filter-normalised LPF = 2 x the absolute one, draw by draw
SWEEP_SIGMA, SWEEP_DROP = 0.005, 0.001  # the sweep's other sigma; its draws are the main ones minus this
HESSIAN_TOP = {"adm": 50.0, "sam_rho0.1": 8.0, "sam_rho0.01": 10.0, "fsgld_adam": 30.0}
# (eigenvalue, trace) converged: ADM's trace and fSGLD's eigenvalue stop at max_iter, each alone.
HESSIAN_CONVERGED = {"adm": (True, False), "sam_rho0.1": (True, True), "sam_rho0.01": (True, True),
                     "fsgld_adam": (False, True)}
GAP = {"adm": 11.0, "sam_rho0.1": 4.0, "sam_rho0.01": 3.0, "fsgld_adam": 8.0}
DRAWS = 4
T_975_DF3 = 3.182446305284263  # Student t quantile 0.975 with 3 df (tables), for t over 4 draws

# Bootstrap replicates: replicate b = value + noise level x OFFSETS[b]. OFFSETS is the same for every
# model (the stage pairs replicates by resampling the same positions), so a paired difference A - B
# has replicates (value_A - value_B) + (noise_A - noise_B) x OFFSETS, with a known spread.
REPLICATES = 40
OFFSETS = np.linspace(-1.0, 1.0, REPLICATES)
FD_NOISE = {"adm": 0.8, "sam_rho0.1": 0.5, "sam_rho0.01": 0.6, "fsgld_adam": 0.7}


def fid_value(recipe: str, average: str, precision: str, steps: int, seed: int) -> float:
    damage = INT8_DAMAGE[recipe] if precision == "int8" else 0.0
    return FID_BASE[recipe] * 20 / steps + AVERAGE_OFFSET[average] + damage + SEED_SHIFT[seed]


def fd_noise(recipe: str, average: str) -> float:
    """Each (recipe, average) has its own noise level, so within-run differences have spread too."""
    return FD_NOISE[recipe] * (1 + 0.5 * AVERAGES.index(average))


def kid_of(fd: float) -> float:
    return fd / 1000


def lpf_value(recipe: str, average: str, seed: int, lpf: dict) -> float:
    """lpf[recipe] is one number (plus 0.001 x the seed shift), or a list or {seed: value} per seed."""
    base = lpf[recipe]
    per_seed = base[seed] if isinstance(base, (list, tuple, dict)) else base + 0.001 * SEED_SHIFT[seed]
    return per_seed + LPF_AVERAGE_OFFSET[average]


def lpf_wiggle(recipe: str, average: str) -> np.ndarray:
    """How the draws scatter around the LPF: its own amplitude per model, so paired draws differ."""
    return 0.0002 * np.array([-1.0, 1.0, -1.0, 1.0]) * (1 + RECIPES.index(recipe) + 4 * AVERAGES.index(average))


# ------------------------------------------------------------------------------------------
# Writing the fixture.

def _metric_context(name: str, settings: dict) -> MeasureContext:
    return MeasureContext(name=name, settings=settings,
                          model_settings=ModelSettings("tiny", 3, {"steps": 1000, "noise_schedule": "cosine",
                                                                   "learn_sigma": True}),
                          model_source="--preset", model=nn.Linear(3, 2), device=torch.device("cpu"),
                          data_path=Path("data.h5"), data_shape=(8, 8, 8, 3), progress=False, started=time.time())


def _write_metric(path: str, name: str, defaults: dict, arrays: dict, extra: dict) -> None:
    ctx = _metric_context(name, dict(defaults))
    write_results(ctx, SimpleNamespace(out=path, weights="weights_raw.pt"), arrays, extra)


EVALSET = {"n": 8, "seed": 0, "num_timesteps": 1000, "t_distribution": "uniform over training steps",
           "image_selection": "seeded permutation prefix"}


def write_lpf(path: str, value: float, recipe: str, average: str = "none") -> None:
    """The lpf stage's layout: the absolute scaling at the top level and in absolute/, the filter
    scaling in filter/, each with draw_losses at sigma and over the sweep (sigma 0.005 and 0.01)."""
    absolute = value + lpf_wiggle(recipe, average)
    # The unperturbed loss scales with LPF, so LPF's increase over it orders the recipes as LPF does.
    loss = 0.9 * value
    sigmas = np.array([SWEEP_SIGMA, 0.01])
    arrays: dict[str, object] = {"sigma": 0.01, "loss": loss, "sweep/sigma": sigmas}
    for prefix, draws in (("", absolute), ("absolute/", absolute), ("filter/", FILTER_FACTOR * absolute)):
        sweep = np.stack([draws - SWEEP_DROP, draws])
        arrays.update({
            f"{prefix}lpf": draws.mean(), f"{prefix}difference": draws.mean() - loss,
            f"{prefix}stderr": draws.std(ddof=1) / np.sqrt(DRAWS), f"{prefix}draw_losses": draws,
            f"{prefix}sweep/lpf": sweep.mean(1), f"{prefix}sweep/difference": sweep.mean(1) - loss,
            f"{prefix}sweep/stderr": sweep.std(1, ddof=1) / np.sqrt(DRAWS), f"{prefix}sweep/draw_losses": sweep})
    _write_metric(path, "lpf", {**lpf_stage.DEFAULTS, "draws": DRAWS, "sigma_sweep": [SWEEP_SIGMA]}, arrays, {
        "loss_terms": "mse+vb", "evaluation_set": EVALSET, "noise": lpf_stage.NOISE["absolute"],
        "scalings": "absolute,filter", "top_level_scaling": "absolute",
        **{f"noise_{scaling}": lpf_stage.NOISE[scaling] for scaling in ("absolute", "filter")}})


def write_perturbation(path: str, slope: float) -> None:
    radii = np.array([0.0, 1.0, 2.0])
    losses = 0.05 + slope * radii[None, :] ** 2 * np.array([[0.9], [1.1]])
    _write_metric(path, "perturbation", {**perturbation_stage.DEFAULTS, "radii": radii.tolist(), "directions": 2}, {
        "radii": radii, "relative_radii": radii / 10, "losses": losses, "loss": 0.05, "parameter_norm": 10.0,
        "loss_mean": losses.mean(0), "loss_std": losses.std(0, ddof=1),
        "difference_mean": losses.mean(0) - 0.05, "difference_std": losses.std(0, ddof=1),
    }, {"loss_terms": "mse+vb", "evaluation_set": EVALSET,
        "directions_kind": "uniform on the unit sphere of all trainable parameters, no filter normalisation",
        "std_convention": "sample standard deviation over directions (ddof 1)"})


def write_surface(path: str, curvature: float) -> None:
    x = np.linspace(-1.0, 1.0, 3)
    losses = 0.05 + curvature * (x[:, None] ** 2 + 2 * x[None, :] ** 2)
    _write_metric(path, "surface", {**surface_stage.DEFAULTS, "grid": 3}, {
        "x": x, "y": x, "losses": losses, "loss": 0.05, "direction_norms": np.array([1.0, 1.0]),
        "direction_cosine": 0.01,
    }, {"loss_terms": "mse+vb", "evaluation_set": EVALSET, "normalisation": "filter (per output slice), ignore=biasbn",
        "layout": "losses[i, j] = L(theta + x[i] * delta + y[j] * eta)"})


def write_hessian(path: str, top: float, converged: tuple[bool, bool] = (True, True)) -> None:
    _write_metric(path, "hessian", {**hessian_stage.DEFAULTS, "batch": 4, "max_iter": 3}, {
        "loss": 0.05, "top_eigenvalue": top, "eigenvalue_iterations": 3, "eigenvalue_converged": converged[0],
        "eigenvalue_history": np.array([top / 2, top, top]), "trace": 20 * top, "trace_stderr": 1.0,
        "trace_samples": np.array([19 * top, 21 * top]), "trace_converged": converged[1], "hessian_vector_products": 5,
    }, {"loss_terms": "mse+vb", "evaluation_set": EVALSET})


def write_exposure(path: str, gap: float) -> None:
    arrays: dict[str, object] = {"reference_l2": np.sqrt(192.0), "reference_sq": 192.0, "steps": np.array(STEPS)}
    for steps in STEPS:
        g = f"steps{steps}"
        training = np.full(steps, 13.0)
        per_t_gap = np.full(steps, gap * 20 / steps)
        sampling = training + per_t_gap
        arrays[f"{g}/timesteps"] = np.linspace(0, 999, steps).astype(np.int64)
        for label, curve in (("training", training), ("sampling", sampling)):
            arrays[f"{g}/{label}/l2"] = np.tile(curve, (2, 1)).astype(np.float32)
            arrays[f"{g}/{label}/l2_mean"], arrays[f"{g}/{label}/l2_stderr"] = curve, np.zeros(steps)
            arrays[f"{g}/{label}/sq_mean"], arrays[f"{g}/{label}/sq_stderr"] = curve ** 2, np.zeros(steps)
        for kind, values in (("l2", per_t_gap), ("sq", sampling ** 2 - training ** 2)):
            arrays[f"{g}/gap/{kind}"], arrays[f"{g}/gap/{kind}_stderr"] = values, np.zeros(steps)
            arrays[f"{g}/gap_{kind}_mean"], arrays[f"{g}/gap_{kind}_mean_stderr"] = values.mean(), 0.0
            arrays[f"{g}/gap_{kind}_sum"], arrays[f"{g}/gap_{kind}_sum_stderr"] = values.sum(), 0.0
    _write_metric(path, "exposure", {**exposure_stage.DEFAULTS, "n_images": 2}, arrays, {
        "gap_convention": GAP_CONVENTION, "index_order": "chain index k", "image_selection": "seeded prefix"})


def write_fid(path: str, metric_name: str, extractor: str, value: float, noise: float) -> None:
    """The attributes and datasets fid.evaluate writes (the extractor itself cannot run in a unit test).

    Replicates are value + noise x OFFSETS (FD) and the same divided by 1000 (KID), all files with
    one bootstrap_seed, as the paired bootstrap of pipeline.fidelity.bootstrap makes them.
    """
    attrs = provenance("fid", {"samples": "samples.h5"})
    attrs.update({"metric_name": metric_name, "value": value, "kid_mean": kid_of(value), "kid_std": 1e-4,
                  "kid_value": kid_of(value), "bootstrap_seed": 0,
                  "kid_subsets": 100, "kid_subset_size": 8, "extractor": extractor, "fidelity_extractor": extractor,
                  "feature_layer": "pool", "feature_dim": 16, "weights_path": "", "weights_sha256": "0" * 64,
                  "n_samples": 8, "n_reference": 8, "seed": 0, "torch_fidelity_version": "0.4.0",
                  "samples_path": "samples.h5", "samples_sha256": "1" * 64, "samples_attrs_json": "{}",
                  "reference_path": "ref.h5", "reference_sha256": "2" * 64, "reference_data_sha256": "",
                  "wall_time_s": 0.1})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        write_attrs(f, {k: str(v) if isinstance(v, str) else v for k, v in attrs.items()})
        f.create_dataset("fd_replicates", data=value + noise * OFFSETS)
        f.create_dataset("kid_replicates", data=kid_of(value + noise * OFFSETS))
        seal_h5(f)  # as every writer of the pipeline does


def write_samples(path: str, shade: int, channels: int) -> None:
    """samples.h5 as the sample stage writes it: uint8 images (N, H, W, C) and int64 seeds."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = np.full((20, 8, 8, channels), shade, dtype=np.uint8)
    images[:, ::2, ::2] = 255 - shade
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(20, 8, 8, channels), compression="gzip")
        f.create_dataset("seeds", data=np.arange(20, dtype=np.int64))
        write_attrs(f, {"steps": 20, "n": 20, "seed": 0, "clip_denoised": True})
        seal_h5(f)  # as every writer of the pipeline does


# FD of held-out real images and of noise: the floor and the ceiling of the reading scale.
CALIBRATION = {"floor": 1.5, "static": 300.0}


def make_study(root: Path, *, dataset: str = "cifar10", extractor: str = "inception", seeds=(0,),
               sam_selection: str = "best_fid_20", lpf: dict | None = None,
               lpf_ema_offset: float | None = None, samples: bool = True, control_seeds=(),
               metrics=("lpf", "perturbation", "surface", "hessian", "exposure"), extra_seeds=None,
               recipes=None) -> dict:
    """Write every input of the micro study under root/results; return the report settings.

    samples=False leaves out the samples files, which only Fig. 2 reads (tests of the claims
    alone do not build figures). extra_seeds: study.extra_seeds (runs with raw weights only);
    recipes: study.recipes (default RECIPES; the others then join through extra_seeds alone).
    """
    config = deep_merge(load_config([DEFAULT_CONFIG]), {
        "results": str(root / "results"),
        "study": {"datasets": [dataset], "recipes": list(recipes or RECIPES), "seeds": list(seeds), "averages": AVERAGES,
                  "precisions": ["fp32", "int8"], "sampling_steps": STEPS, "metrics": list(metrics),
                  "extra_seeds": dict(extra_seeds or {})},
        "fid": {"extractor": extractor},
        "report": {"sam_selection": sam_selection, "show_paper_numbers": True,
                   "negative_control": {"recipe": "adm", "seeds": list(control_seeds)}},
    })
    assert config_problems(config) == []
    results, metric_name = config["results"], "FID" if extractor == "inception" else "FD-EffNetLite0"
    lpf = {**LPF, **(lpf or {})}
    channels = 1 if dataset == "fashion_mnist" else 3
    for run in study_runs(config["study"]):
        recipe, seed = run.recipe, run.seed
        write_train_log(Path(layout.train_log(results, dataset, recipe, seed)),
                        train_settings(config, dataset, recipe, seed),
                        {name: [0.1, 0.09, 0.08] if name != "lr" else [1e-4] * 3
                         for name in ("loss", "mse", "vb", "grad_norm", "lr")},
                        [0.5], SimpleNamespace(n_averaged=2), processes=1)
        if recipe in VALIDATION_FID:
            # Selection samples exist for T'=20 only; their noise level is irrelevant to the choice.
            write_fid(layout.validation_fid(results, dataset, recipe, seed, 20, extractor), metric_name,
                      extractor, VALIDATION_FID[recipe] + SEED_SHIFT[seed], 0.1)
        for average in ["none"] if run.raw_only else AVERAGES:
            for precision in ("fp32", "int8"):
                for steps in STEPS:
                    write_fid(layout.fid(results, dataset, recipe, seed, average, precision, steps, extractor),
                              metric_name, extractor, fid_value(recipe, average, precision, steps, seed),
                              fd_noise(recipe, average))
                    if samples:
                        write_samples(layout.samples(results, dataset, recipe, seed, average, precision, steps),
                                      shade=40 * RECIPES.index(recipe), channels=channels)
            metric = lambda name: layout.metric(results, dataset, recipe, seed, average, name)  # noqa: E731
            value = lpf_value(recipe, average, seed, lpf)
            if lpf_ema_offset is not None and recipe == "adm" and average == "ema":
                value = lpf_value("adm", "none", seed, lpf) + lpf_ema_offset
            flat = lpf_value(recipe, "none", 0, lpf)
            writers = {"lpf": lambda p: write_lpf(p, value, recipe, average),
                       "perturbation": lambda p: write_perturbation(p, 100 * flat),
                       "surface": lambda p: write_surface(p, 100 * flat),
                       "hessian": lambda p: write_hessian(p, HESSIAN_TOP[recipe], HESSIAN_CONVERGED[recipe]),
                       "exposure": lambda p: write_exposure(p, GAP[recipe])}
            for name in metrics:
                Path(metric(name)).parent.mkdir(parents=True, exist_ok=True)
                writers[name](metric(name))
    for seed in control_seeds:
        # The negative control's ADM runs: raw fp32 weights at the smallest T', and LPF.
        write_train_log(Path(layout.train_log(results, dataset, "adm", seed)), train_settings(config, dataset, "adm", seed),
                        {name: [0.1, 0.09, 0.08] if name != "lr" else [1e-4] * 3
                         for name in ("loss", "mse", "vb", "grad_norm", "lr")},
                        [0.5], SimpleNamespace(n_averaged=2), processes=1)
        write_fid(layout.fid(results, dataset, "adm", seed, "none", "fp32", min(STEPS), extractor), metric_name,
                  extractor, fid_value("adm", "none", "fp32", min(STEPS), seed), fd_noise("adm", "none"))
        if "lpf" in metrics:
            path = layout.metric(results, dataset, "adm", seed, "none", "lpf")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_lpf(path, lpf_value("adm", "none", seed, lpf), "adm", "none")
    for kind, value in CALIBRATION.items():
        path = layout.calibration_fid(results, dataset, kind, config["sampling"]["n_samples"], extractor)
        write_fid(path, metric_name, extractor, value, 0.3)
        with h5py.File(path, "r+") as f:  # what the fid stage copies from the calibration samples
            f.attrs["samples_attrs_json"] = json.dumps({"kind": kind, "source": f"{kind} images"})
            seal_h5(f)
    return stage_settings(config, "report")


def claims_of(settings: dict):
    """The claims frame alone (collect, choose rho, decide): no tables, figures or files written."""
    study = Study(dict(settings))
    data = collect(study)
    return claims_frame(study, data, select_sam(study, data.validation, data.metric_name))


def read_table(out: Path, name: str):
    import pandas as pd
    return pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)


def cell(frame, column: str, **row: str) -> str:
    mask = np.ones(len(frame), dtype=bool)
    for key, value in row.items():
        mask &= (frame[key] == value).to_numpy()
    assert mask.sum() == 1, (column, row, frame.to_string())
    return frame.loc[mask, column].iloc[0]


# ------------------------------------------------------------------------------------------
# The report, cell by cell.

@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_one_seed")
    settings = make_study(root)
    out = root / "results" / "report"
    written = build_report(settings, out)
    return settings, out, written


# Expected numbers, computed here with the textbook formulas (not with pipeline.stats).

def percentile_bounds(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    low, high = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def t_quantile_975(df: int) -> float:
    """Closed forms of Student's t quantile at 0.975 for df 1 and 2; a table value for df 3."""
    p = 0.975
    if df == 1:
        return float(np.tan(np.pi * (p - 0.5)))
    if df == 2:
        return float((2 * p - 1) / np.sqrt(2 * p * (1 - p)))
    assert df == 3
    return T_975_DF3


def t_bounds(values) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student-t interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    half = t_quantile_975(values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def value_text(estimate: float, low: float, high: float) -> str:
    """A one-model cell: 4 significant digits for the value and each bound."""
    return f"{estimate:.4g} [{low:.4g}, {high:.4g}]"


def effect_text(estimate: float, low: float, high: float) -> str:
    """An effect cell: signed, 4 significant digits."""
    return f"{estimate:+.4g} [{low:+.4g}, {high:+.4g}]"


def interval_of(text: str) -> tuple[float, float]:
    """The bounds of an "effect [low, high]" cell."""
    low, high = text.split("[")[1].rstrip("]").split(", ")
    return float(low), float(high)


BETWEEN_RUNS = ("C1", "C3", "C4", "C5", "C7", "C9", "C10", "PC", "NC")
WITHIN_RUN = ("C2", "C6", "C8")


def test_every_listed_output_exists_and_is_of_its_kind(one_seed) -> None:
    settings, out, written = one_seed
    results = settings["results"]
    expected = layout.report_tables(results) + layout.report_figures(results)
    assert sorted(map(str, written)) == sorted(expected + [f"{results}/report/index.md",
                                                           f"{results}/report/index.html"])
    for path in expected:
        data = Path(path).read_bytes()
        assert len(data) > 100, path
        if path.endswith(".png"):
            assert data.startswith(b"\x89PNG")
        if path.endswith(".pdf"):
            assert data.startswith(b"%PDF")
        if path.endswith(".html"):
            page = data.decode()
            figure = Path(path).stem in layout.REPORT_FIGURES
            # A figure's page: the image inline, its caption visible under it (Snakemake's report shows this page).
            assert page.startswith("<!doctype html>") and ("<figcaption>" in page and "data:image/png;base64," in page
                                                          if figure else "<table>" in page), path
        if path.endswith(".tex"):
            assert "\\begin{tabular}" in data.decode() and "\\caption{" in data.decode()
            # Every non-ASCII character of the cells (σ, §, †, ±, →) is spelled as a LaTeX command.
            assert data.decode().isascii(), (path, sorted({ch for ch in data.decode() if not ch.isascii()}))
    index = (out / "index.md").read_text()
    for name in layout.REPORT_TABLES + layout.REPORT_FIGURES:
        assert name in index
    # The open choices, as recorded by the fixture's files.
    assert "sigma 0.01, draws 4" in index and "radii [0.0, 1.0, 2.0], 2 directions" in index
    assert "int8 = 8-bit per tensor, symmetric" in index and GAP_CONVENTION in index
    assert "+SAM uses rho=0.1" in index and "constant over each run" in index
    assert "Caution: 8 samples per model" in index  # the fixture's FIDs use 8 samples
    # Per estimate: fSGLD's three eigenvalues and ADM's three traces stopped at max_iter.
    assert "of 12 estimates each, 3 top eigenvalue(s) and 3 trace(s) stopped at max_iter" in index


def test_small_sample_warning_only_below_ten_thousand() -> None:
    from pipeline.report.index import _small_sample_warning

    assert _small_sample_warning([50_000, 50_000]) == []
    assert "Caution: 9999 samples" in _small_sample_warning([50_000, 9_999])[0]


def test_sam_rho_follows_the_validation_samples(one_seed) -> None:
    _, out, _ = one_seed
    sweep = read_table(out, "rho_sweep")
    # On the main samples rho 0.01 has the lower FID at T'=20 (9 vs 12); the selection samples
    # (VALIDATION_FID: 10 vs 14) pick rho 0.1, and they are the ones that must decide.
    assert cell(sweep, "FID (T'=20)", recipe="sam_rho0.01").startswith("9 [")
    assert cell(sweep, "FID (T'=20)", recipe="sam_rho0.1").startswith("12 [")
    assert cell(sweep, "selected", recipe="sam_rho0.1") == "yes"
    assert cell(sweep, "selected", recipe="sam_rho0.01") == ""
    assert cell(sweep, "rho", recipe="adm") == "0"
    table2 = read_table(out, "table2_fid")
    assert set(table2["recipe"]) - {""} == {"adm", "sam_rho0.1", "fsgld_adam"}  # "": calibration rows
    note = "+SAM uses rho=0.1 (recipe sam_rho0.1; lowest FID of the raw fp32 weights at T'=20"
    assert note in (out / "table2_fid.md").read_text()
    assert note.replace("_", "\\_") in (out / "table2_fid.tex").read_text()
    assert "selection samples of their own (sampling seed 1)" in (out / "table2_fid.md").read_text()


def test_one_seed_cells_are_draw_level_intervals(one_seed) -> None:
    _, out, _ = one_seed
    t2 = read_table(out, "table2_fid")
    assert list(t2.columns) == ["dataset", "algorithm", "recipe", "FID (T'=20)", "KID (T'=20)",
                                "floor → static position (T'=20)", "paper FID (T'=20)", "FID (T'=100)",
                                "KID (T'=100)", "floor → static position (T'=100)", "paper FID (T'=100)"]
    assert list(t2["algorithm"]) == ["ADM", "+EMA", "+SWA", "+SAM", "+SAM+EMA", "+SAM+SWA",
                                     "+fSGLD (Adam base, ext.)", "+fSGLD+EMA (Adam base, ext.)",
                                     "+fSGLD+SWA (Adam base, ext.)", "real test images (floor)",
                                     "static noise (ceiling)"]
    # The calibration rows, and each model's place between them: (value - floor) / (static - floor).
    floor, static = CALIBRATION["floor"], CALIBRATION["static"]
    assert cell(t2, "FID (T'=20)", algorithm="real test images (floor)").startswith(f"{floor:.4g} [")
    assert cell(t2, "FID (T'=20)", algorithm="static noise (ceiling)").startswith(f"{static:.4g} [")
    adm = fid_value("adm", "none", "fp32", 20, 0)
    assert cell(t2, "floor → static position (T'=20)", algorithm="ADM") == f"{(adm - floor) / (static - floor):.2f}"
    labels = {"adm": "ADM", "sam_rho0.1": "+SAM", "fsgld_adam": "+fSGLD (Adam base, ext.)"}
    for recipe, average in [("adm", "none"), ("adm", "swa"), ("sam_rho0.1", "ema"), ("fsgld_adam", "swa")]:
        algorithm = algorithm_label(labels[recipe], average)
        for steps in STEPS:
            value = fid_value(recipe, average, "fp32", steps, 0)
            replicates = value + fd_noise(recipe, average) * OFFSETS
            assert cell(t2, f"FID (T'={steps})", algorithm=algorithm) == value_text(
                value, *percentile_bounds(replicates))
            assert cell(t2, f"KID (T'={steps})", algorithm=algorithm) == value_text(
                kid_of(value), *percentile_bounds(kid_of(replicates)))
    # The paper's Table 2 beside ours; nothing for the extension's rows.
    assert cell(t2, "paper FID (T'=20)", algorithm="ADM") == "34.47"
    assert cell(t2, "paper FID (T'=100)", algorithm="+SAM+SWA") == "2.96"
    assert cell(t2, "paper FID (T'=20)", algorithm="+fSGLD (Adam base, ext.)") == ""

    t4 = read_table(out, "table4_quantization")
    # int8 and fp32 of one average share the noise level: the paired change has no spread.
    assert cell(t4, "FID change int8 (T'=20)", algorithm="ADM") == effect_text(10.0, 10.0, 10.0)
    assert cell(t4, "FID int8 (T'=100)", algorithm="+SAM+EMA") == value_text(
        12.0 / 5 - 2 + 0.5, *percentile_bounds(12.0 / 5 - 2 + 0.5 + fd_noise("sam_rho0.1", "ema") * OFFSETS))
    assert cell(t4, "paper FID change int8 (T'=20)", algorithm="+SAM") == "-0.07"

    t1 = read_table(out, "table1_adm_vs_sam")
    assert list(t1["algorithm"]) == ["ADM", "+SAM", "+fSGLD (Adam base, ext.)"]
    assert cell(t1, "paper FID fp32 → int8 (T'=20)", algorithm="+SAM") == "9.01 → 8.94 (-0.07)"
    assert cell(t1, "paper eps-norm gap", algorithm="ADM") == "+11.39"
    # LPF: t over the 4 Monte-Carlo draws; Hessian trace: normal interval from trace_stderr = 1.
    draws = LPF["adm"] + lpf_wiggle("adm", "none")
    assert cell(t1, "LPF absolute", algorithm="ADM") == value_text(*t_bounds(draws))
    assert cell(t1, "LPF filter", algorithm="ADM") == value_text(*t_bounds(FILTER_FACTOR * draws))
    # ADM's trace stopped at max_iter in the fixture (†), its eigenvalue converged.
    assert cell(t1, "Hessian trace", algorithm="ADM") == value_text(1000.0, 1000 - 1.959963985,
                                                                      1000 + 1.959963985) + " †"
    # No draw-level error for the top eigenvalue: the bare value.
    assert cell(t1, "Hessian top eigenvalue", algorithm="ADM") == "50"
    assert "One training seed: these intervals leave out the seed-to-seed variation" in (
        out / "table1_adm_vs_sam.md").read_text()


def test_table3_marks_and_table4_names_its_scheme(one_seed) -> None:
    _, out, _ = one_seed
    t3 = read_table(out, "table3_lpf")
    lpf_columns = [c for c in t3.columns if c.startswith("LPF")]
    assert lpf_columns == ["LPF absolute σ=0.005", "LPF absolute σ=0.01", "LPF filter σ=0.005", "LPF filter σ=0.01",
                           "LPF - loss absolute", "LPF - loss filter"]
    # LPF's increase over the loss: the fixture's loss is 0.9 x its LPF value, so ADM's increase is 0.1 of it.
    increase = LPF["adm"] + lpf_wiggle("adm", "none") - 0.9 * LPF["adm"]
    assert cell(t3, "LPF - loss absolute", algorithm="ADM") == value_text(*t_bounds(increase))
    assert list(t3["algorithm"])[:3] == ["ADM", "+EMA", "+SWA"]
    # The sweep's sigma: the fixture's draws there are the main draws minus SWEEP_DROP.
    swept = LPF["adm"] + lpf_wiggle("adm", "none") - SWEEP_DROP
    assert cell(t3, "LPF absolute σ=0.005", algorithm="ADM") == value_text(*t_bounds(swept))
    for algorithm in ["+fSGLD (Adam base, ext.)", "+fSGLD+EMA (Adam base, ext.)", "+fSGLD+SWA (Adam base, ext.)"]:
        for sigma in ("0.005", "0.01"):
            assert cell(t3, f"LPF absolute σ={sigma}", algorithm=algorithm).endswith(" §")
            assert "§" not in cell(t3, f"LPF filter σ={sigma}", algorithm=algorithm)
        # fSGLD's eigenvalue did not converge in the fixture, its trace did: only the eigenvalue is marked.
        assert cell(t3, "Hessian top eigenvalue", algorithm=algorithm) == "30 †"
        assert "†" not in cell(t3, "Hessian trace", algorithm=algorithm)
    for algorithm in ["ADM", "+EMA", "+SWA"]:
        # ADM's trace stopped at max_iter, its eigenvalue converged.
        assert "†" not in cell(t3, "Hessian top eigenvalue", algorithm=algorithm)
        assert cell(t3, "Hessian trace", algorithm=algorithm).endswith(" †")
    for algorithm in ["+SAM", "+SAM+SWA"]:
        assert not any(mark in cell(t3, column, algorithm=algorithm)
                       for column in t3.columns for mark in ("§", "†"))
    assert "§ marks fSGLD's absolute LPF" in (out / "table3_lpf.md").read_text()
    assert "† marks an estimate that stopped at metrics.hessian.max_iter" in (out / "table3_lpf.md").read_text()
    title = (out / "table4_quantization.md").read_text().splitlines()[0]
    assert "scheme: per-tensor symmetric min-max, weights of >= 2 dims" in title


def test_one_seed_between_run_claims_are_inconclusive(one_seed) -> None:
    _, out, _ = one_seed
    claims = read_table(out, "claims")
    between = claims[claims["id"].isin(BETWEEN_RUNS)]
    assert set(between["id"]) >= {"C1", "C3", "C4", "C5", "C9", "C10", "PC", "NC"}
    for _, row in between.iterrows():
        if row["id"] == "NC":
            # This fixture has no control runs (report.negative_control.seeds is empty).
            assert row["verdict"] == "n.a." and "no control runs" in row["rule"]
            continue
        assert row["verdict"] == "inconclusive", row.to_dict()
        assert "one training seed" in row["rule"], row.to_dict()
    # Inconclusive even though the draw-level interval lies well below 0.
    sam_lpf = cell(claims, "effect [CI]", id="C1", algorithm="+SAM",
                   measure="LPF absolute (sigma 0.01): +SAM - ADM")
    paired = (LPF["sam_rho0.1"] + lpf_wiggle("sam_rho0.1", "none")) - (LPF["adm"] + lpf_wiggle("adm", "none"))
    assert sam_lpf == effect_text(*t_bounds(paired)) and interval_of(sam_lpf)[1] < 0
    c5 = cell(claims, "effect [CI]", id="C5", algorithm="+SAM", measure="FID: +SAM - ADM")
    difference = (FID_BASE["sam_rho0.1"] - FID_BASE["adm"]) + (FD_NOISE["sam_rho0.1"] - FD_NOISE["adm"]) * OFFSETS
    assert c5 == effect_text(FID_BASE["sam_rho0.1"] - FID_BASE["adm"], *percentile_bounds(difference))
    assert interval_of(c5)[1] < 0

    # Within one run the draw-level interval decides.
    within = claims[claims["id"].isin(WITHIN_RUN)]
    assert set(within["id"]) == set(WITHIN_RUN)
    assert (within["verdict"] == "held").all(), within.to_string()
    assert not within["rule"].str.contains("one training seed").any()
    c6 = cell(claims, "effect [CI]", id="C6", condition="same training run, T'=20, fp32", measure="FID: +EMA - ADM")
    difference = AVERAGE_OFFSET["ema"] + (fd_noise("adm", "ema") - fd_noise("adm", "none")) * OFFSETS
    assert c6 == effect_text(AVERAGE_OFFSET["ema"], *percentile_bounds(difference))
    assert cell(claims, "interval", id="C6", condition="same training run, T'=20, fp32",
                measure="FID: +EMA - ADM") == "paired bootstrap, centred on the estimate, 40 replicates"


def test_positive_control_is_no_failure_with_one_seed(one_seed) -> None:
    _, out, _ = one_seed
    # One seed cannot decide the positive control: the one-seed rule, not a failed control, so no warning.
    index = (out / "index.md").read_text()
    head = index.split("## Tables")[0]
    assert "WARNING" not in head
    claims = read_table(out, "claims")
    assert set(lpf_rows(claims, "PC")["verdict"]) == {"inconclusive"}


def test_control_failures_flags_fabricated_rows() -> None:
    import pandas as pd
    from pipeline.report.claims import COLUMNS

    def row(claim_id: str, verdict: str, measure: str) -> dict:
        return {**{c: "" for c in COLUMNS}, "id": claim_id, "dataset": "cifar10", "measure": measure,
                "verdict": verdict}

    fine = pd.DataFrame([row("NC", "inconclusive", "LPF"), row("NC", "n.a.", "FID"), row("PC", "held", "LPF"),
                         row("C1", "not held", "LPF")], columns=COLUMNS)
    assert control_failures(fine) == []
    broken = pd.DataFrame([row("NC", "held", "LPF nc"), row("NC", "not held", "FID nc"),
                           row("PC", "not held", "LPF pc"), row("PC", "inconclusive", "FID pc")], columns=COLUMNS)
    flags = control_failures(broken)
    assert len(flags) == 4
    assert "negative control on cifar10 (LPF nc) came out 'held'" in flags[0]
    assert "negative control on cifar10 (FID nc) came out 'not held'" in flags[1]
    assert "positive control on cifar10 (LPF pc) is 'not held': by this measure SAM at its largest rho is decidedly " \
           "less flat" in flags[2]
    assert "did not detect even its strongest intervention" in flags[3]
    assert "positive control on cifar10 (FID pc) is 'inconclusive'" in flags[3]


def test_evidence_banner_only_below_the_thresholds(one_seed) -> None:
    from pipeline.report.index import evidence_banner

    settings, out, _ = one_seed
    # The fixture: 8 samples per model and 3 training steps, far below the defaults (1000, 500).
    assert "A pipeline check, not evidence:** 8 samples per model (below 1000) and 3 training steps " \
           "(below 500)" in (out / "index.md").read_text().split("## Tables")[0]
    study = Study(dict(settings))
    data = collect(study)
    at = {**settings, "report": {**settings["report"], "evidence": {"min_samples": 8, "min_training_steps": 3}}}
    assert evidence_banner(Study(at), data) is None  # at the thresholds is not below them
    short = {**settings, "report": {**settings["report"], "evidence": {"min_samples": 8, "min_training_steps": 4}}}
    banner = evidence_banner(Study(short), data)
    assert banner is not None and "3 training steps (below 4)" in banner and "samples" not in banner


def lpf_rows(claims, claim_id: str, **row: str):
    """The rows of one claim on the absolute and filter LPF (not on LPF's increase over the loss)."""
    mask = (claims["id"] == claim_id) & claims["measure"].str.match(r"LPF (absolute|filter)")
    for key, value in row.items():
        mask &= claims[key] == value
    rows = claims.loc[mask]
    assert len(rows) == 2, claims.to_string()
    return rows


# Per-seed absolute LPF of the chosen +SAM (rho 0.1) on seeds 0-2; ADM's is 0.097 + 0.001 x shift.
ADM_LPF_3 = [LPF["adm"] + 0.001 * SEED_SHIFT[s] for s in range(3)]
SAM_CLEARLY_FLATTER = [0.050, 0.056, 0.047]
SAM_CLEARLY_SHARPER = [0.140, 0.146, 0.137]
SAM_SEED_NOISE = [a + d for a, d in zip(ADM_LPF_3, [0.002, -0.003, 0.001])]


@pytest.mark.parametrize("sam_lpf, expected", [(SAM_CLEARLY_FLATTER, "held"), (SAM_CLEARLY_SHARPER, "not held"),
                                               (SAM_SEED_NOISE, "inconclusive")])
def test_three_seeds_decide_flatness_on_seed_intervals(tmp_path, sam_lpf, expected) -> None:
    settings = make_study(tmp_path, seeds=(0, 1, 2), lpf={"sam_rho0.1": sam_lpf}, samples=False, metrics=("lpf",))
    claims = claims_of(settings)
    per_seed = np.array(sam_lpf) - np.array(ADM_LPF_3)
    for scaling, factor in (("absolute", 1.0), ("filter", FILTER_FACTOR)):
        measure = f"LPF {scaling} (sigma 0.01): +SAM - ADM"
        assert cell(claims, "verdict", id="C1", algorithm="+SAM", measure=measure) == expected
        assert cell(claims, "interval", id="C1", algorithm="+SAM", measure=measure) == "t over 3 paired seeds"
        assert cell(claims, "effect [CI]", id="C1", algorithm="+SAM", measure=measure) == effect_text(
            *t_bounds(factor * per_seed))
    # The positive control is the same comparison (rho 0.1 is the grid's largest).
    assert set(lpf_rows(claims, "PC")["verdict"]) == {expected}
    # A positive control that is not held with three seeds is a failed control: the report says so.
    flagged = any("positive control" in flag for flag in control_failures(claims))
    assert flagged == (expected != "held")


def test_three_seed_cells_are_t_intervals_over_seeds(tmp_path) -> None:
    settings = make_study(tmp_path, seeds=(0, 1, 2), sam_selection="rho=0.1", samples=False, metrics=("lpf",))
    study = Study(dict(settings))
    data = collect(study)
    choices = select_sam(study, data.validation, data.metric_name)
    t2 = table2(study, data, choices).frame
    for steps in STEPS:
        seed_values = [fid_value("adm", "none", "fp32", steps, s) for s in range(3)]
        assert cell(t2, f"FID (T'={steps})", algorithm="ADM") == value_text(*t_bounds(seed_values))
    t3 = table3(study, data, choices).frame
    seed_values = [lpf_value("sam_rho0.1", "ema", s, LPF) for s in range(3)]
    assert cell(t3, "LPF absolute σ=0.01", algorithm="+SAM+EMA") == value_text(*t_bounds(seed_values))
    assert "mean over training seeds 0, 1, 2 [95% t interval of the mean over seeds]" in " ".join(
        table2(study, data, choices).notes)
    notes = " ".join(claims_table(study, data, choices).notes)
    assert "Training seeds 0, 1, 2: each effect is the mean of its per-seed values" in notes
    assert "±" not in notes  # no cell is "mean ± std" any more


def test_power_table_gives_the_paired_spread_and_the_seeds_needed(tmp_path) -> None:
    # +SAM's absolute LPF is ADM's plus a per-seed difference with a known mean and sd.
    differences = [-0.004, -0.001, -0.002]
    sam = [a + d for a, d in zip(ADM_LPF_3, differences)]
    settings = make_study(tmp_path, seeds=(0, 1, 2), lpf={"sam_rho0.1": sam}, samples=False, metrics=("lpf",))
    study = Study(dict(settings))
    data = collect(study)
    table = power_table(study, data, select_sam(study, data.validation, data.metric_name))
    row = dict(id="C1", measure="LPF absolute (sigma 0.01)", comparison="+SAM - ADM")

    n = len(differences)
    mean = sum(differences) / n
    sd = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5
    mean_a, mean_b = sum(sam) / n, sum(ADM_LPF_3) / n
    sd_a = (sum((a - mean_a) ** 2 for a in sam) / (n - 1)) ** 0.5
    sd_b = (sum((b - mean_b) ** 2 for b in ADM_LPF_3) / (n - 1)) ** 0.5
    r = sum((a - mean_a) * (b - mean_b) for a, b in zip(sam, ADM_LPF_3)) / ((n - 1) * sd_a * sd_b)
    frame = table.frame
    assert cell(frame, "seeds", **row) == "3"
    assert float(cell(frame, "mean difference", **row)) == pytest.approx(mean, rel=1e-3)
    assert float(cell(frame, "sd difference", **row)) == pytest.approx(sd, rel=1e-3)
    assert float(cell(frame, "correlation", **row)) == pytest.approx(r, rel=1e-3)
    assert float(cell(frame, "sd unpaired", **row)) == pytest.approx((sd_a ** 2 + sd_b ** 2) ** 0.5, rel=1e-3)
    for power in (0.5, 0.8):
        needed = seeds_needed(mean, sd, 0.95, power)
        assert needed is not None and needed > n
        assert cell(frame, f"seeds needed (power {power:g})", **row) == str(needed)
    assert float(cell(frame, "MDE (study seeds)", **row)) == pytest.approx(minimum_detectable_effect(sd, 3), rel=1e-3)
    assert study.power_target_seeds == 8
    assert float(cell(frame, "MDE (8 seeds)", **row)) == pytest.approx(minimum_detectable_effect(sd, 8), rel=1e-3)
    # Only rows decided on seeds, and n.a. rows never.
    claims = claims_of(settings)
    assert len(frame) == int((claims["interval"] == "t over 3 paired seeds").sum())


def test_power_table_leaves_out_one_seed_rows(one_seed) -> None:
    _, out, _ = one_seed
    assert read_table(out, "power").empty
    assert "rest on one training seed" in (out / "power.md").read_text(encoding="utf-8")


def test_equivalence_claim_uses_the_lpf_margin(tmp_path) -> None:
    # ADM's EMA weights 0.01 flatter than its raw ones (LPF 0.097): one seed, within one run, so the
    # t interval over the 4 paired draws decides, against the margin lpf_relative x 0.097.
    offset = -0.01
    settings = make_study(tmp_path, lpf_ema_offset=offset, samples=False, metrics=("lpf",))
    paired = offset + lpf_wiggle("adm", "ema") - lpf_wiggle("adm", "none")
    _, low, high = t_bounds(paired)

    def c2_verdicts(lpf_relative: float) -> set:
        margins = {**settings["report"]["margins"], "lpf_relative": lpf_relative}
        claims = claims_of({**settings, "report": {**settings["report"], "margins": margins}})
        rows = lpf_rows(claims, "C2", algorithm="+EMA")
        assert (rows["effect [CI]"].iloc[0]) == effect_text(offset, low, high)
        return set(rows["verdict"])

    assert settings["report"]["margins"]["lpf_relative"] == 0.05
    assert high <= -0.05 * LPF["adm"]  # wholly beyond the default margin of 0.00485
    assert c2_verdicts(0.05) == {"not held"}
    assert low > -0.2 * LPF["adm"]  # wholly inside a margin of 0.0194
    assert c2_verdicts(0.2) == {"held"}
    assert low < offset < high  # a margin of exactly 0.01 cuts the interval
    assert c2_verdicts(-offset / LPF["adm"]) == {"inconclusive"}


def test_negative_control_runs_are_paired_with_the_study_seeds(tmp_path) -> None:
    none = claims_of(make_study(tmp_path / "none", samples=False, metrics=("lpf",)))
    assert list(none.loc[none["id"] == "NC", "verdict"]) == ["n.a."]

    one = claims_of(make_study(tmp_path / "one", control_seeds=(100,), samples=False, metrics=("lpf",)))
    nc = one[one["id"] == "NC"]
    # Two LPF scalings and FD, KID at T'=20; one pair of runs decides nothing, though its draw-level
    # interval is reported.
    assert len(nc) == 4 and (nc["verdict"] == "inconclusive").all(), nc.to_string()
    assert nc["rule"].str.contains("one training seed").all()
    assert nc["rule"].str.contains("the draw-level interval alone").all()
    assert (nc["condition"] == "seeds 0 vs 100, raw weights").all()

    # Three pairs whose runs differ by seed noise only (+1, -1, -1): a real test, and it stays inconclusive.
    three = claims_of(make_study(tmp_path / "three", seeds=(0, 1, 2), control_seeds=(100, 101, 102),
                                 samples=False, metrics=("lpf",)))
    nc = three[three["id"] == "NC"]
    assert len(nc) == 4 and (nc["verdict"] == "inconclusive").all(), nc.to_string()
    assert (nc["interval"] == "t over 3 paired seeds").all()
    assert control_failures(three) == []

    # Control runs whose LPF sits above their partners' every time: the control fails and is flagged.
    drift = {0: 0.097, 1: 0.097, 2: 0.097, 100: 0.100, 101: 0.1012, 102: 0.1021}
    failed = claims_of(make_study(tmp_path / "drift", seeds=(0, 1, 2), control_seeds=(100, 101, 102),
                                  lpf={"adm": drift}, samples=False, metrics=("lpf",)))
    assert set(lpf_rows(failed, "NC")["verdict"]) == {"not held"}
    assert any("negative control on cifar10 (LPF absolute" in flag for flag in control_failures(failed))


def test_extra_seeds_narrow_raw_weight_claims_only(tmp_path) -> None:
    """study.extra_seeds: seed 3 of ADM and SAM rho 0.1, raw weights only. Comparisons of raw weights
    between those two use 4 seeds, comparisons with other recipes or of EMA/SWA the 3 they share; the
    negative control pairs all 4 ADM seeds; the whole report builds (figures, answers, power table)."""
    settings = make_study(tmp_path, seeds=(0, 1, 2), extra_seeds={"adm": [3], "sam_rho0.1": [3]},
                          control_seeds=(100, 101, 102, 103))
    required = [item.path for item in report_inputs(settings)]
    assert layout.fid(settings["results"], "cifar10", "adm", 3, "none", "int8", 20, "inception") in required
    assert not [p for p in required if "/seed3/" in p and ("/ema/" in p or "/swa/" in p or "_ema" in p)]
    out = tmp_path / "results" / "report"
    build_report(settings, out)
    claims = read_table(out, "claims")
    c1 = lpf_rows(claims, "C1", algorithm="+SAM")
    assert len(c1) and (c1["seeds"] == "4").all() and (c1["interval"] == "t over 4 paired seeds").all(), c1
    c8 = claims[claims["id"] == "C8"]
    assert len(c8) and (c8["seeds"] == "3").all(), c8.to_string()
    fsgld = claims[(claims["id"] == "C5") & claims["algorithm"].str.contains("fSGLD")]
    assert len(fsgld) and (fsgld["seeds"] == "3").all(), fsgld.to_string()
    nc = claims[claims["id"] == "NC"]
    assert (nc["condition"] == "seeds 0, 1, 2, 3 vs 100, 101, 102, 103, raw weights").all(), nc.to_string()
    assert (nc["seeds"] == "4").all()
    page = (out / "index.md").read_text()
    assert "+SAM is flatter than ADM: held 4 (4 seeds)" in page
    assert "+fSGLD (Adam base, ext.) is flatter than ADM: held 5 (3 seeds)" in page
    assert "raw weights only (study.extra_seeds): ADM (adm) 3; +SAM (sam_rho0.1) 3" in (out / "claims.md").read_text()


def test_metrics_outside_the_study_leave_their_columns_out(tmp_path) -> None:
    settings = make_study(tmp_path, samples=False, metrics=("lpf",))
    study = Study(dict(settings))
    data = collect(study)
    choices = select_sam(study, data.validation, data.metric_name)
    t1 = table1(study, data, choices).frame
    assert "LPF absolute" in t1.columns and not any("Hessian" in c or "gap" in c for c in t1.columns)
    assert not any("Hessian" in c for c in table3(study, data, choices).frame.columns)
    claims = claims_frame(study, data, choices)
    assert "C4" not in set(claims["id"])  # no exposure files, no exposure claim
    # fSGLD's C1 rests on the filter LPF alone when Hessian and perturbation are not measured.
    fsgld = claims[(claims["id"] == "C1") & (claims["algorithm"] == "+fSGLD (Adam base, ext.)")]
    assert list(fsgld["measure"]) == ["LPF filter (sigma 0.01): +fSGLD (Adam base, ext.) - ADM",
                                      "LPF increase over the loss filter (sigma 0.01): +fSGLD (Adam base, ext.) - ADM"]


def test_two_seeds_effnet_never_meets_paper_fid(tmp_path) -> None:
    settings = make_study(tmp_path, extractor="effnet-lite0", seeds=(0, 1), sam_selection="rho=0.1")
    out = tmp_path / "out"
    build_report(settings, out)
    t2 = read_table(out, "table2_fid")
    # Seeds 0 and 1 differ by exactly 1 (SEED_SHIFT): t interval with 1 degree of freedom.
    assert cell(t2, "FD-EffNetLite0 (T'=20)", algorithm="ADM") == value_text(*t_bounds([30.0, 31.0]))
    assert cell(t2, "FD-EffNetLite0 (T'=100)", algorithm="+SAM+EMA") == value_text(
        *t_bounds([12.0 / 5 - 2, 12.0 / 5 - 2 + 1]))
    assert set(t2["recipe"]) - {""} == {"adm", "sam_rho0.1", "fsgld_adam"}  # rho fixed by the config rule
    t4 = read_table(out, "table4_quantization")
    assert cell(t4, "FD-EffNetLite0 change int8 (T'=20)", algorithm="ADM") == effect_text(10.0, 10.0, 10.0)
    for name in layout.REPORT_TABLES:
        # Headers, cells and titles name the metric truly (the notes explain that it is not FID).
        csv = (out / f"{name}.csv").read_text()
        title = (out / f"{name}.md").read_text().splitlines()[0]
        assert "FID" not in (csv + title).replace("FD-EffNetLite0", ""), name
    t1 = read_table(out, "table1_adm_vs_sam")
    assert "FD-EffNetLite0 fp32 (T'=20)" in t1.columns
    assert "paper LPF" in t1.columns  # LPF may be compared; FID may not
    assert "fixed by report.sam_selection = rho=0.1" in (out / "rho_sweep.md").read_text()


def test_missing_inputs_name_the_file_and_its_rule(tmp_path, capsys) -> None:
    settings = make_study(tmp_path, metrics=("lpf",))
    results = settings["results"]
    missing = Path(layout.metric(results, "cifar10", "sam_rho0.1", 0, "swa", "lpf"))
    missing.unlink()
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=r"missing 1 of its .* input files") as err:
        build_report(settings, out)
    assert str(missing) in str(err.value) and "rule metric (python -m pipeline lpf)" in str(err.value)
    assert not out.exists()

    # The command line prints the same message and exits with status 2.
    import json
    assert cli_main(["report", "--settings", json.dumps(settings), "--out-dir", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err

    write_lpf(str(missing), 0.05, "sam_rho0.1", "swa")
    validation = Path(layout.validation_fid(results, "cifar10", "sam_rho0.01", 0, 20, "inception"))
    validation.unlink()
    with pytest.raises(PipelineError, match=r"missing 1 of its") as err:
        build_report(settings, out)
    assert str(validation) in str(err.value) and "rule fid_validation (python -m pipeline fid)" in str(err.value)

    write_fid(str(validation), "FID", "inception", VALIDATION_FID["sam_rho0.01"], 0.1)
    samples = Path(layout.samples(results, "cifar10", "sam_rho0.1", 0, "ema", "int8", 20))
    samples.unlink()
    with pytest.raises(PipelineError, match="rule sample") as err:
        build_report(settings, out)
    assert str(samples) in str(err.value)

    with h5py.File(layout.fid(results, "cifar10", "adm", 0, "none", "fp32", 20, "inception"), "r+") as f:
        del f.attrs["value"]
        seal_h5(f)  # an intact file of another version, not a damaged one
    with pytest.raises(PipelineError, match="rule fid"):
        build_report(settings, out)

    # A fid file from before the paired bootstrap: no replicates, so no interval can be given.
    old = layout.fid(results, "cifar10", "adm", 0, "none", "fp32", 20, "inception")
    write_fid(old, "FID", "inception", 30.0, 0.8)
    with h5py.File(old, "r+") as f:
        del f["fd_replicates"]
        seal_h5(f)
    with pytest.raises(PipelineError, match=r"lacks an entry the report needs .*fd_replicates.*rule fid") as err:
        build_report(settings, out)
    assert old in str(err.value)


def test_calibration_rows_are_collected_and_required(tmp_path) -> None:
    settings = make_study(tmp_path, metrics=("lpf",))
    collected = collect(Study(settings))
    frame = collected.calibration.sort_values("kind").reset_index(drop=True)
    n = settings["n_samples"]
    assert list(frame.columns) == ["dataset", "kind", "n", "value", "kid_value",
                                   "fd_replicates", "kid_replicates", "bootstrap_seed", "n_samples", "source"]
    assert frame.kind.tolist() == ["floor", "static"] and (frame.dataset == "cifar10").all() and (frame.n == n).all()
    assert frame.value.tolist() == [CALIBRATION["floor"], CALIBRATION["static"]]
    assert frame.source.tolist() == ["floor images", "static images"]
    assert len(collected.fid) and "static" not in set(collected.fid.get("kind", []))  # model rows stay apart

    missing = Path(layout.calibration_fid(settings["results"], "cifar10", "floor", n, "inception"))
    missing.unlink()
    with pytest.raises(PipelineError, match="missing 1 of its") as err:
        collect(Study(settings))
    assert str(missing) in str(err.value) and "rule fid_calibration" in str(err.value)


# ------------------------------------------------------------------------------------------
# Pieces.

def test_labels_and_number_formats() -> None:
    assert algorithm_label("ADM", "none") == "ADM" and algorithm_label("ADM", "ema") == "+EMA"
    assert algorithm_label("+SAM", "swa") == "+SAM+SWA"
    assert algorithm_label("+fSGLD (Adam base, ext.)", "ema") == "+fSGLD+EMA (Adam base, ext.)"
    assert fixed([3.834]) == "3.83" and fixed([-0.07], signed=True) == "-0.07" and fixed([]) == ""
    assert fixed([1.0, 2.0]) == "1.50 ± 0.71" and fixed([13.55], signed=True) == "+13.55"
    assert significant([0.0631234]) == "0.06312" and significant([1.0, 1.0]) == "1 ± 0"


def test_markdown_and_latex_rendering() -> None:
    import pandas as pd
    table = Table("t", "A | title", pd.DataFrame([{"algorithm": "+SAM", "x_1 (T'=20)": "1.50 ± 0.71"}]),
                  ["50% of rho_1 & more."])
    md = to_markdown(table)
    assert "| algorithm | x_1 (T'=20) |\n|:---|---:|\n| +SAM | 1.50 ± 0.71 |" in md
    assert "- 50% of rho_1 & more." in md
    tex = to_latex(table)
    assert r"\begin{tabular}{lr}" in tex and r"+SAM & 1.50 $\pm$ 0.71 \\" in tex
    assert r"x\_1 (T'=20)" in tex and r"50\% of rho\_1 \& more." in tex
    assert latex_escape("a→b ε") == r"a$\rightarrow$b $\epsilon$"
    assert latex_escape("LPF σ=0.01 §, 30 †") == r"LPF $\sigma$=0.01 \S{}, 30 \dag{}"


def test_readers_match_the_real_metric_stages(tmp_path) -> None:
    """The report's readers on files the real stages wrote (tiny UNet, a few evaluations each)."""
    from pipeline.nn.presets import build_unet

    rng = np.random.default_rng(0)
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
        seal_h5(f)  # as every writer of the pipeline does
    torch.manual_seed(0)
    model = build_unet("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "weights.pt"
    save_torch(model.state_dict(), weights)
    runs = {"lpf": ["--draws", "2", "--n-eval", "2", "--sigma-sweep"],
            "perturbation": ["--radii", "0", "1", "--directions", "2", "--n-eval", "2"],
            "exposure": ["--n-images", "1", "--steps", "2"]}
    for stage, flags in runs.items():
        argv = [stage, "--weights", str(weights), "--data", str(data), "--preset", "tiny", "--out",
                str(tmp_path / f"{stage}.h5"), "--device", "cpu", "--no-progress", *flags]
        assert cli_main(argv) == 0
    perturbation = read_perturbation(str(tmp_path / "perturbation.h5"))
    assert perturbation["radii"].tolist() == [0.0, 1.0] and perturbation["losses"].shape == (2, 2)
    curves = read_exposure_curves(str(tmp_path / "exposure.h5"))
    assert set(curves) == {2} and curves[2]["sampling"].shape == (2,) and curves[2]["reference_l2"] > 0
    # The scalar readers behind the tables. The surface and Hessian stages are left out for time;
    # tests/test_flatness.py pins their keys, which the fixture above writes.
    rows = {}
    for name in ("lpf", "exposure"):
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            rows[name] = METRIC_ROWS[name](f)
    assert rows["lpf"][0]["draw_losses"].shape == (2,) and rows["lpf"][0]["sigma"] == 0.01
    assert rows["exposure"][0]["steps"] == 2 and np.isfinite(rows["exposure"][0]["gap_l2_mean"])


def test_bootstrap_intervals_are_centred_on_the_estimate() -> None:
    """FD replicates sit above the estimate (a resample repeats images, which adds small-sample bias):
    the interval takes their spread, not their location, so it always holds the estimate."""
    from pipeline.report.effects import BOOTSTRAP, Reading, difference, draw_level_interval, identity

    replicates = 7.0 + np.linspace(-1.0, 1.0, 41)  # centred on 7 while the estimate is 5
    one = draw_level_interval([Reading(5.0, replicates, BOOTSTRAP)], identity, 5.0, 0.95)
    low, high = percentile_bounds(replicates - 7.0 + 5.0)
    assert (one.low, one.high) == pytest.approx((low, high)) and one.low < 5.0 < one.high
    # A paired difference: the shared bias cancels, the centring changes nothing.
    other = Reading(4.0, replicates - 1.0, BOOTSTRAP)
    diff = draw_level_interval([Reading(5.0, replicates, BOOTSTRAP), other], difference, 1.0, 0.95)
    assert (diff.low, diff.high) == pytest.approx((1.0, 1.0))


def test_recipes_named_only_in_extra_seeds_join_the_report(tmp_path) -> None:
    """The CPU study's shape: ADM and SAM rho 0.1 at every variant, the other recipes raw-only runs."""
    settings = make_study(tmp_path, seeds=(0, 1, 2), recipes=["adm", "sam_rho0.1"], control_seeds=(100, 101, 102),
                          extra_seeds={"sam_rho0.01": [0, 1, 2], "fsgld_adam": [0, 1, 2]}, sam_selection="rho=0.1")
    out = tmp_path / "results" / "report"
    build_report(settings, out)
    claims = read_table(out, "claims")
    assert set(lpf_rows(claims, "C10")["seeds"]) == {"3"}  # the rho grid, from raw-only runs of rho 0.01
    c5 = claims[(claims["id"] == "C5") & claims["algorithm"].str.contains("fSGLD")]
    assert len(c5) == 2 and (c5["verdict"] != "n.a.").all(), c5.to_string()
    table3 = read_table(out, "table3_lpf")
    # fSGLD-Adam has raw-weight runs only: one row, no empty +EMA/+SWA rows.
    assert list(table3.loc[table3["recipe"] == "fsgld_adam", "algorithm"]) == ["+fSGLD (Adam base, ext.)"]
    assert list(read_table(out, "table2_fid").query("recipe == 'sam_rho0.1'")["algorithm"]) == [
        "+SAM", "+SAM+EMA", "+SAM+SWA"]


def test_extra_seeds_are_checked_against_the_study() -> None:
    base = load_config([DEFAULT_CONFIG])
    raw_less = deep_merge(base, {"study": {"averages": ["ema"], "extra_seeds": {"adm": [1]}}})
    assert any("study.extra_seeds adds runs scored on their raw weights" in p for p in config_problems(raw_less))
    unknown = deep_merge(base, {"study": {"extra_seeds": {"sam_rho7": [1]}}})
    assert any("sam_rho7" in p for p in config_problems(unknown))
    overlap = deep_merge(base, {"study": {"extra_seeds": {"adm": [100]}},
                                "report": {"negative_control": {"seeds": [100]}}})
    assert any("negative_control.seeds [100] are also study seeds" in p for p in config_problems(overlap))
    # Runs: study.recipes x study.seeds in full, then the extra ones raw-only; a recipe only named there joins.
    study = {"recipes": ["adm", "sam_rho0.1"], "seeds": [0, 1], "extra_seeds": {"adm": [1, 5], "sgd": [2]}}
    assert [(r.recipe, r.seed, r.raw_only) for r in study_runs(study)] == [
        ("adm", 0, False), ("adm", 1, False), ("adm", 5, True), ("sam_rho0.1", 0, False), ("sam_rho0.1", 1, False),
        ("sgd", 2, True)]
