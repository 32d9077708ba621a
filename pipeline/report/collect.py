"""Read the report's inputs: FID files, metric files, training logs (and sample images for Fig. 2).

The files are those of pipeline.study_files, the list the report rule takes as its inputs, so the
report reads exactly what the rules wrote. Scalars go
into long pandas frames, one row per file (exposure: per file and T'); the curves and grids the
figures need are read by the `read_*` functions on demand. A missing or unreadable input is a
PipelineError naming the file and the rule that makes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pandas as pd
import yaml

from pipeline.errors import PipelineError
from pipeline.io.integrity import verify_h5
from pipeline.report.study import Study
from pipeline.study_files import MAKER, Input, report_inputs

# Scalar attributes of the metric files that record a convention (SPEC section 12).
CONVENTION_ATTRS = ("loss_terms", "noise", "gap_convention", "directions_kind", "std_convention",
                    "normalisation", "eigenvalue_method", "trace_method", "loss_gradient")


def required_inputs(study: Study) -> list[Input]:
    """Every file the report reads scalars from: the study's enumeration less the samples (Fig. 2 reads
    those on demand)."""
    return [item for item in report_inputs(study.settings) if item.kind != "sample"]


def check_inputs(inputs: list[Input]) -> None:
    """PipelineError listing the missing files (at most 12) and the rules that make them."""
    missing = [i for i in inputs if not Path(i.path).is_file()]
    if not missing:
        return
    shown = "\n".join(f"  - {i.path}  <- {i.maker}" for i in missing[:12])
    more = f"\n  ... and {len(missing) - 12} more" if len(missing) > 12 else ""
    raise PipelineError(f"the report is missing {len(missing)} of its {len(inputs)} input files:\n{shown}{more}\n"
                        f"Run the workflow (snakemake --cores all) or the named stages first.")


@dataclasses.dataclass
class Collected:
    """The scalars of every input, plus the conventions their provenance records.

    fid: dataset, recipe, seed, average, precision, steps, value (FD), kid_value (unbiased KID on all
        rows), fd_replicates, kid_replicates (paired bootstrap arrays, aligned across files),
        bootstrap_seed, n_samples.
    validation: the same columns for the selection samples of the SAM recipes (raw fp32 weights).
    lpf: dataset, recipe, seed, average, scaling (absolute | filter), sigma, main (the configured sigma
        rather than the sweep), loss, lpf, difference, stderr, draw_losses (array, aligned across files).
    perturbation: dataset, recipe, seed, average, radius (the largest), increases (per-direction loss
        increase at it, aligned across files), increase (their mean).
    hessian: dataset, recipe, seed, average, top_eigenvalue, trace, trace_stderr, eigenvalue_converged,
        trace_converged (each estimate its own flag: power iteration can converge while Hutchinson does not).
    exposure: dataset, recipe, seed, average, steps, gap_l2_mean, gap_l2_mean_stderr, gap_l2_sum,
        gap_sq_mean, reference_l2.
    train: dataset, recipe, seed, steps (logged), swa_snapshots, lr_first, lr_last, settings (YAML).
    calibration: dataset, kind ("floor": held-out real images, "static": noise), n (N asked for,
        the models' N), value, kid_value, fd_replicates, kid_replicates, bootstrap_seed, n_samples (images used: fewer than n when a
        dataset holds fewer held-out images), source (where the images came from).
    conventions: {metric name: {"settings": [distinct settings blocks], attr: [distinct values]}}.
    """

    metric_name: str
    fid: pd.DataFrame
    validation: pd.DataFrame | None
    lpf: pd.DataFrame | None
    hessian: pd.DataFrame | None
    perturbation: pd.DataFrame | None
    exposure: pd.DataFrame | None
    train: pd.DataFrame
    conventions: dict[str, dict[str, list[Any]]]
    calibration: pd.DataFrame | None = None


def collect(study: Study) -> Collected:
    """Check that every input exists, then read their scalars."""
    inputs = required_inputs(study)
    check_inputs(inputs)
    rows: dict[str, list[dict[str, Any]]] = {"fid": [], "validation": [], "lpf": [], "hessian": [], "exposure": [],
                                             "perturbation": [], "train": [], "calibration": []}
    conventions: dict[str, dict[str, list[Any]]] = {}
    names = set()
    for item in inputs:
        with _open(item.path, item.maker) as f:
            if item.kind in ("fid", "validation", "calibration"):
                names.add(str(f.attrs["metric_name"]))
                row = {**item.key, "value": float(f.attrs["value"]),
                       "kid_value": float(f.attrs["kid_value"]),
                       "fd_replicates": np.asarray(f["fd_replicates"][...], dtype=np.float64),
                       "kid_replicates": np.asarray(f["kid_replicates"][...], dtype=np.float64),
                       "bootstrap_seed": int(f.attrs["bootstrap_seed"]),
                       "n_samples": int(f.attrs["n_samples"])}
                if item.kind == "calibration":
                    row["source"] = _calibration_source(f)
                rows[item.kind].append(row)
            elif item.kind == "train":
                rows["train"].append({**item.key, **_train_row(f)})
            else:
                _note_conventions(conventions, item.name, f)
                reader = METRIC_ROWS.get(item.name)
                if reader is not None:
                    rows[item.name].extend({**item.key, **row} for row in reader(f))
    if not names:
        raise PipelineError("the study has no FID files to report on; check the study lists in the config.")
    if len(names) != 1:
        raise PipelineError(f"the FID files disagree on the metric ({sorted(names)}); they come from different "
                            f"extractors. Delete the stale ones and rerun the fid rule.")
    frames = {kind: pd.DataFrame(values) if values else None for kind, values in rows.items()}
    return Collected(metric_name=names.pop(), fid=frames["fid"], validation=frames["validation"],
                     lpf=frames["lpf"], hessian=frames["hessian"], perturbation=frames["perturbation"],
                     exposure=frames["exposure"], train=frames["train"], conventions=conventions,
                     calibration=frames["calibration"])


def _calibration_source(f: h5py.File) -> str:
    """Where the calibration images came from, as the calibration stage recorded it in the samples'
    attributes (which the fid stage copies as JSON)."""
    samples = json.loads(f.attrs.get("samples_attrs_json", "{}") or "{}")
    return str(samples.get("source", ""))


@contextlib.contextmanager
def _open(path: str, maker: str) -> Iterator[h5py.File]:
    """h5py.File for reading; an unreadable file or a missing entry becomes a PipelineError."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PipelineError(f"{path} cannot be read as HDF5 ({err}); delete it and rerun {maker}.") from None
    try:
        with f:
            verify_h5(f, path, f"delete it and rerun {maker}")
            yield f
    except KeyError as err:
        raise PipelineError(f"{path} lacks an entry the report needs ({err}); it was written by another "
                            f"version of {maker}: rerun it.") from None


def _scalar(f: h5py.File, key: str) -> float:
    return float(np.asarray(f[key][()]))


def _lpf_rows(f: h5py.File) -> list[dict[str, Any]]:
    """One row per (scaling, sigma): the main sigma (main=True) and every sigma of the sweep."""
    rows = []
    sigma, loss = _scalar(f, "sigma"), _scalar(f, "loss")
    sweep = np.asarray(f["sweep/sigma"][...], dtype=np.float64)
    for scaling in str(_plain(f.attrs["scalings"])).split(","):
        group = f[scaling]
        rows.append({"scaling": scaling, "sigma": sigma, "main": True, "loss": loss, "lpf": _scalar(group, "lpf"),
                     "difference": _scalar(group, "difference"), "stderr": _scalar(group, "stderr"),
                     "draw_losses": np.asarray(group["draw_losses"][...], dtype=np.float64)})
        draws = np.asarray(group["sweep/draw_losses"][...], dtype=np.float64)
        for i, value in enumerate(sweep):
            if value == sigma:
                continue
            rows.append({"scaling": scaling, "sigma": float(value), "main": False, "loss": loss,
                         "lpf": float(draws[i].mean()), "difference": float(draws[i].mean() - loss),
                         "stderr": float(draws[i].std(ddof=1) / np.sqrt(draws.shape[1])) if draws.shape[1] > 1
                         else 0.0, "draw_losses": draws[i]})
    return rows


def _hessian_rows(f: h5py.File) -> list[dict[str, Any]]:
    return [{"top_eigenvalue": _scalar(f, "top_eigenvalue"), "trace": _scalar(f, "trace"),
             "trace_stderr": _scalar(f, "trace_stderr"),
             "eigenvalue_converged": bool(f["eigenvalue_converged"][()]),
             "trace_converged": bool(f["trace_converged"][()])}]


def _exposure_rows(f: h5py.File) -> list[dict[str, Any]]:
    rows = []
    for steps in np.asarray(f["steps"][...]).tolist():
        group = f[f"steps{steps}"]
        rows.append({"steps": int(steps), "gap_l2_mean": _scalar(group, "gap_l2_mean"),
                     "gap_l2_mean_stderr": _scalar(group, "gap_l2_mean_stderr"),
                     "gap_l2_sum": _scalar(group, "gap_l2_sum"), "gap_sq_mean": _scalar(group, "gap_sq_mean"),
                     "reference_l2": _scalar(f, "reference_l2")})
    return rows


def _perturbation_rows(f: h5py.File) -> list[dict[str, Any]]:
    """The loss increase at the largest radius, per direction (K,) and its mean."""
    radii = np.asarray(f["radii"][...], dtype=np.float64)
    losses = np.asarray(f["losses"][...], dtype=np.float64)  # (K, R)
    increases = losses[:, -1] - _scalar(f, "loss")
    return [{"radius": float(radii[-1]), "increases": increases, "increase": float(increases.mean())}]


METRIC_ROWS = {"lpf": _lpf_rows, "hessian": _hessian_rows, "exposure": _exposure_rows,
               "perturbation": _perturbation_rows}


def _train_row(f: h5py.File) -> dict[str, Any]:
    settings = yaml.safe_load(f.attrs["settings_yaml"]) or {}
    lr = np.asarray(f["lr"][...])
    return {"steps": len(lr), "swa_snapshots": int(f.attrs.get("swa_snapshots", -1)),
            "lr_first": float(lr[0]) if len(lr) else float("nan"),
            "lr_last": float(lr[-1]) if len(lr) else float("nan"), "settings": settings}


def _note_conventions(conventions: dict[str, dict[str, list[Any]]], name: str, f: h5py.File) -> None:
    """Keep the distinct values of each recorded convention (one value when the study is coherent)."""
    record = conventions.setdefault(name, {})
    settings = (yaml.safe_load(f.attrs.get("settings_yaml", "")) or {}).get(name)
    values = {"settings": settings, **{a: _plain(f.attrs[a]) for a in CONVENTION_ATTRS if a in f.attrs}}
    for key, value in values.items():
        seen = record.setdefault(key, [])
        if value not in seen:
            seen.append(value)


def _plain(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------
# Curves, surfaces and images for the figures.

def read_perturbation(path: str) -> dict[str, np.ndarray]:
    """radii (R,), loss_mean / loss_std / difference_mean / difference_std (R,), losses (K, R)."""
    with _open(path, MAKER["metric"].format(name="perturbation")) as f:
        return {key: np.asarray(f[key][...], dtype=np.float64)
                for key in ("radii", "loss_mean", "loss_std", "difference_mean", "difference_std", "losses")}


def read_surface(path: str) -> dict[str, Any]:
    """x (G,), y (G,), losses (G, G) with losses[i, j] at (x[i], y[j]), and the loss terms."""
    with _open(path, MAKER["metric"].format(name="surface")) as f:
        return {"x": np.asarray(f["x"][...]), "y": np.asarray(f["y"][...]),
                "losses": np.asarray(f["losses"][...], dtype=np.float64),
                "loss_terms": _plain(f.attrs.get("loss_terms", "?"))}


def read_exposure_curves(path: str) -> dict[int, dict[str, np.ndarray]]:
    """Per T': timesteps (K,) and the mean L2 norms of the training and sampling curves (K,)."""
    curves = {}
    with _open(path, MAKER["metric"].format(name="exposure")) as f:
        reference = _scalar(f, "reference_l2")
        for steps in np.asarray(f["steps"][...]).tolist():
            group = f[f"steps{steps}"]
            curves[int(steps)] = {"timesteps": np.asarray(group["timesteps"][...]),
                                  "training": np.asarray(group["training/l2_mean"][...], dtype=np.float64),
                                  "sampling": np.asarray(group["sampling/l2_mean"][...], dtype=np.float64),
                                  "reference_l2": reference}
    return curves


TRAINING_CURVES = ("loss", "mse", "vb", "grad_norm")


def read_training_curves(path: str) -> dict[str, np.ndarray]:
    """Per-step training curves of one run's train.h5: each of TRAINING_CURVES as (steps,)."""
    with _open(path, MAKER["train"]) as f:
        return {key: np.asarray(f[key][...], dtype=np.float64) for key in TRAINING_CURVES}


def read_samples(path: str, count: int) -> np.ndarray:
    """The first `count` images of a samples.h5: uint8 (n, H, W, C), n = min(count, N)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path} does not exist; Fig. 2 needs it. Make it with {MAKER['sample']}.")
    with _open(path, MAKER["sample"]) as f:
        return np.asarray(f["images"][:count])
