"""The paper's figures from the metric files and samples, each saved as PNG and PDF.

fig1_loss_surface         Fig. 1: 2-D loss surfaces of ADM and +SAM (and fSGLD), one shared
                          colour scale per dataset.
fig2_samples_fp32_int8    Figs. 2 and 4: the first 16 samples of ADM, +SAM, +EMA, +SAM+EMA (and
                          fSGLD) in fp32 and each quantized precision at the smallest T'.
fig5_loss_vs_perturbation Figs. 5, 7, 8 (right): loss and loss increase against the norm of a
                          random weight perturbation, every algorithm, one column per dataset.
fig6_eps_norm             Figs. 6, 7, 8 (left): mean ||eps_theta||_2 per timestep on training
                          inputs and along the sampling chain, one panel per dataset and T'.
training_curves           (not in the paper) loss, mse, vb and gradient norm per training step
                          of every run, smoothed, one column per dataset: a diverging or
                          unfinished run shows here.

Figures are built on matplotlib.figure.Figure directly (Agg canvas, no pyplot state). With
several seeds, curves and surfaces are means over seeds and bands are the std over seeds; with
one seed, the perturbation band is the std over random directions. Every line style, band and
thin line has a legend entry or is named in the figure's title; legends sit below the panels,
outside the data. Axis labels use matplotlib mathtext.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline import layout
from pipeline.io.atomic import atomic_path
from pipeline.report.collect import (TRAINING_CURVES, Collected, read_exposure_curves, read_perturbation,
                                     read_samples, read_surface, read_training_curves)
from pipeline.report.study import Study, algorithm_label
from pipeline.report.tables import Choices, raw_average

LINESTYLES = {"none": "-", "ema": "--", "swa": ":"}
GRID_IMAGES, GRID_COLUMNS = 16, 4


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """{name}.png (150 dpi) and {name}.pdf in `out_dir`, each atomically; the PDF carries no date."""
    paths = []
    for ext, options in (("png", {"dpi": 150}), ("pdf", {"metadata": {"CreationDate": None}})):
        path = Path(out_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, **options)
        paths.append(path)
    return paths


def _message_figure(title: str, message: str) -> Figure:
    """A figure that says why there is nothing to plot (the file must still exist for the rule)."""
    fig = Figure(figsize=(6, 2))
    fig.suptitle(title)
    fig.text(0.5, 0.45, message, ha="center", va="center", wrap=True)
    return fig


def _colours(study: Study) -> dict[str, tuple]:
    palette = colormaps["tab10"]
    return {recipe: palette(i % 10) for i, recipe in enumerate(study.recipes)}


def _featured(study: Study, choices: Choices, dataset: str) -> list[str]:
    """ADM, the chosen SAM recipe(s) and the fSGLD recipes: the comparison of Figs. 1 and 2."""
    chosen = [c.recipe for c in choices.get(dataset, {}).values()]
    return [r for r in [study.baseline, *chosen, *study.fsgld_recipes] if r is not None]


def _mean_over_seeds(seeds: list[int], read: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean over `seeds` of read(seed), and the std over them (None with one seed)."""
    stack = np.stack([read(seed) for seed in seeds])
    return stack.mean(axis=0), (stack.std(axis=0, ddof=1) if len(stack) > 1 else None)


# ------------------------------------------------------------------------------------------
# Fig. 1: loss surfaces.

def fig1_loss_surface(study: Study, data: Collected, choices: Choices) -> Figure:
    title = (r"Fig. 1: training loss along two filter-normalised random directions $\delta, \eta$ "
             "(white lines: contours of equal loss)")
    if "surface" not in study.metrics:
        return _message_figure(title, "surface is not in study.metrics, so no surface was measured.")
    raw = raw_average(study)
    panels = {d: _featured(study, choices, d) for d in study.datasets}
    columns = max(1, max(len(p) for p in panels.values()))
    fig = Figure(figsize=(3.6 * columns + 0.8, 3.2 * len(study.datasets)), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(study.datasets), columns, squeeze=False)
    for row, dataset in enumerate(study.datasets):
        if not panels[dataset]:
            for ax in axes[row]:
                ax.set_axis_off()
            continue
        surfaces = {}
        for recipe in panels[dataset]:
            per_seed = [read_surface(layout.metric(study.results, dataset, recipe, seed, raw, "surface"))
                        for seed in study.seeds_of(recipe, raw)]
            surfaces[recipe] = np.mean([s["losses"] for s in per_seed], axis=0)
            x, y, terms = per_seed[0]["x"], per_seed[0]["y"], per_seed[0]["loss_terms"]
        # One colour scale per dataset, so the panels' flatness compares by eye.
        grids = [surfaces[r] for r in panels[dataset]]
        low, high = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
        norm = LogNorm(low, high) if low > 0 and high > 10 * low else Normalize(low, high)
        mesh = None
        for col, recipe in enumerate(panels[dataset]):
            ax = axes[row, col]
            z = surfaces[recipe].T  # z[j, i] = L at (x[i], y[j]), the layout pcolormesh expects
            mesh = ax.pcolormesh(x, y, z, shading="nearest", norm=norm, cmap="viridis")
            if len(x) > 1 and len(y) > 1 and high > low:
                ax.contour(x, y, z, levels=np.geomspace(low, high, 12) if isinstance(norm, LogNorm) else 12,
                           colors="white", linewidths=0.5, norm=norm)
            ax.set_title(f"{algorithm_label(study.label(recipe), raw)} ({dataset})")
            ax.set_xlabel(r"coefficient $a$ of direction $\delta$")
            ax.set_ylabel(r"coefficient $b$ of direction $\eta$")
            ax.set_aspect("equal")
        for col in range(len(panels[dataset]), columns):
            axes[row, col].set_axis_off()
        fig.colorbar(mesh, ax=list(axes[row, :len(panels[dataset])]),
                     label=rf"loss $L(\theta + a\delta + b\eta)$ ({terms})")
    return fig


# ------------------------------------------------------------------------------------------
# Fig. 2 / 4: samples in fp32 and quantized.

def mosaic(images: np.ndarray, columns: int = GRID_COLUMNS, padding: int = 1) -> np.ndarray:
    """uint8 (n, H, W, C) -> one uint8 (rows*(H+p)+p, cols*(W+p)+p, C) image on white."""
    n, height, width, channels = images.shape
    cols, rows = min(columns, n), -(-n // columns)
    canvas = np.full((rows * (height + padding) + padding, cols * (width + padding) + padding, channels),
                     255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        canvas[top:top + height, left:left + width] = image
    return canvas


def sample_columns(study: Study) -> list[tuple[str, int]]:
    """(precision, T') of Fig. 2's columns: fp32 at every T', then the first quantized precision."""
    columns = [("fp32", steps) for steps in study.steps_for("fp32")] if "fp32" in study.precisions else []
    # The first quantized precision of study.precisions, else of extra_precisions (e.g. none: [int8]).
    quantized = study.quantized_precisions[:1]
    return columns + [(precision, steps) for precision in quantized for steps in study.steps_for(precision)]


def fig2_samples(study: Study, data: Collected, choices: Choices) -> Figure:
    name = data.metric_name
    rows = sample_rows(study, choices)
    first_seeds = {study.seeds_of(recipe, average)[0] for _, recipe, average in rows}
    if not rows:
        return _message_figure("Figs. 2 and 4", "the study has neither ADM, SAM nor fSGLD recipes to show.")
    columns = sample_columns(study)
    fig = Figure(figsize=(max(2.6 * len(columns), 6.5), 2.9 * len(rows)), layout="constrained")
    fig.suptitle(f"Figs. 2 and 4: first {GRID_IMAGES} samples per variant "
                 f"({_seed_words(first_seeds)})\n"
                 f"sample i starts from the same noise in every panel;\npanel titles: {name} on all samples")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (dataset, recipe, average) in enumerate(rows):
        seed = study.seeds_of(recipe, average)[0]
        for c, (precision, steps) in enumerate(columns):
            ax = axes[r, c]
            if not study.scored(average, precision, steps):
                ax.set_axis_off()  # e.g. SWA without int8: that variant was not sampled
                continue
            path = layout.samples(study.results, dataset, recipe, seed, average, precision, steps)
            grid = mosaic(read_samples(path, GRID_IMAGES))
            if grid.shape[2] == 1:
                ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(grid, interpolation="nearest")
            value = data.fid.loc[(data.fid.dataset == dataset) & (data.fid.recipe == recipe)
                                 & (data.fid.seed == seed) & (data.fid.average == average)
                                 & (data.fid.precision == precision) & (data.fid.steps == steps), "value"].mean()
            ax.set_title(f"{algorithm_label(study.label(recipe), average)}, {precision}, T'={steps}\n"
                         f"{dataset}: {name} {value:.1f}", fontsize=8)
            ax.set_axis_off()
    return fig


# ------------------------------------------------------------------------------------------
# Figs. 5, 7, 8: loss under perturbation.

def fig5_loss_vs_perturbation(study: Study, data: Collected, choices: Choices) -> Figure:
    title = "Figs. 5, 7, 8: loss under random weight perturbations"
    if "perturbation" not in study.metrics:
        return _message_figure(title, "perturbation is not in study.metrics, so it was not measured.")
    colours = _colours(study)
    fig = Figure(figsize=(max(10.0, 5.0 * len(study.datasets) + 1.0), 8.5), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(2, len(study.datasets), squeeze=False)
    # What the shaded bands are, as the legend's last entry.
    band = "±1 std over training seeds" if len(study.seeds) > 1 else "±1 std over random directions"
    labelled: dict[str, object] = {}
    for col, dataset in enumerate(study.datasets):
        for recipe in study.table_recipes(choices, dataset):
            for average in study.metric_averages("perturbation"):
                seeds = study.seeds_of(recipe, average)
                if not seeds:
                    continue
                curves = {s: read_perturbation(layout.metric(study.results, dataset, recipe, s, average,
                                                             "perturbation")) for s in seeds}
                radii = curves[seeds[0]]["radii"]
                label = algorithm_label(study.label(recipe), average)
                for row, key in enumerate(("loss", "difference")):
                    mean, spread = _mean_over_seeds(seeds, lambda s: curves[s][f"{key}_mean"])
                    if spread is None:
                        spread = curves[seeds[0]][f"{key}_std"]
                    ax = axes[row, col]
                    (line,) = ax.plot(radii, mean, color=colours[recipe], linestyle=LINESTYLES[average])
                    labelled.setdefault(label, line)
                    ax.fill_between(radii, mean - spread, mean + spread, color=colours[recipe], alpha=0.12,
                                    linewidth=0)
        axes[0, col].set_title(dataset)
        axes[0, col].set_ylabel(r"loss $L(\theta + \gamma u)$")
        axes[1, col].set_ylabel(r"loss increase $L(\theta + \gamma u) - L(\theta)$")
        for row in range(2):
            axes[row, col].set_xlabel(r"perturbation norm $\gamma = \|\Delta\theta\|_2$ ($u$: random unit direction)")
            axes[row, col].grid(alpha=0.3)
    handles = [*labelled.values(), Patch(color="0.6", alpha=0.35, linewidth=0)]
    fig.legend(handles, [*labelled, f"shaded band: {band}"], loc="outside lower center", fontsize=8,
               ncol=min(3, len(handles)))
    return fig


# ------------------------------------------------------------------------------------------
# Figs. 6, 7, 8: eps-norm on training inputs vs along the sampling chain.

def fig6_eps_norm(study: Study, data: Collected, choices: Choices) -> Figure:
    title = r"Figs. 6, 7, 8: $\|\epsilon_\theta(x_t, t)\|_2$ on training inputs vs along the sampling chain"
    if "exposure" not in study.metrics:
        return _message_figure(title, "exposure is not in study.metrics, so it was not measured.")
    colours = _colours(study)
    steps_list = sorted(set(data.exposure["steps"].tolist()))
    # At least 10 inches wide: the legend's three columns of long labels must fit under one panel.
    fig = Figure(figsize=(max(10.0, 5.0 * len(steps_list) + 1.0), 4.0 * len(study.datasets) + 1.4),
                 layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(study.datasets), len(steps_list), squeeze=False)
    labelled: dict[str, object] = {}
    for row, dataset in enumerate(study.datasets):
        for recipe in study.table_recipes(choices, dataset):
            for average in study.metric_averages("exposure"):
                seeds = study.seeds_of(recipe, average)
                if not seeds:
                    continue
                curves = {s: read_exposure_curves(layout.metric(study.results, dataset, recipe, s, average,
                                                                "exposure")) for s in seeds}
                label = algorithm_label(study.label(recipe), average)
                for col, steps in enumerate(steps_list):
                    ax = axes[row, col]
                    first = curves[seeds[0]][steps]
                    t = first["timesteps"]
                    training = _mean_over_seeds(seeds, lambda s: curves[s][steps]["training"])[0]
                    sampling = _mean_over_seeds(seeds, lambda s: curves[s][steps]["sampling"])[0]
                    # One "Training" reference as in the paper (ADM's); the others' training curves faint.
                    if recipe == study.baseline and average == raw_average(study):
                        labelled.setdefault("training inputs, ADM", ax.plot(t, training, color="black",
                                                                            linewidth=2.0)[0])
                        labelled.setdefault(r"$\sqrt{CHW}$: norm of pure noise $\epsilon$",
                                            ax.axhline(first["reference_l2"], color="grey", linestyle=":",
                                                       linewidth=1))
                    else:
                        labelled.setdefault("training inputs, other algorithms",
                                            ax.plot(t, training, color="0.75", linewidth=0.6)[0])
                    labelled.setdefault(f"{label}, sampling chain",
                                        ax.plot(t, sampling, color=colours[recipe],
                                                linestyle=LINESTYLES[average])[0])
        for col, steps in enumerate(steps_list):
            ax = axes[row, col]
            ax.set_title(f"{dataset}, T'={steps}")
            # Inverted so that time runs the way the sampler does: t = 1000 on the left, t = 0 on the right.
            ax.invert_xaxis()
            ax.set_xlabel(r"timestep $t$ (decreasing: sampling runs left to right)")
            ax.set_ylabel(r"mean $\|\epsilon_\theta(x_t, t)\|_2$")
            ax.grid(alpha=0.3)
    fig.legend(list(labelled.values()), list(labelled), loc="outside lower center", fontsize=8,
               ncol=min(3, len(labelled)))
    return fig


# ------------------------------------------------------------------------------------------
# Training curves (not in the paper): every run, every seed.

CURVE_LABELS = {"loss": "training loss", "mse": r"$L_{\mathrm{simple}}$ (mse)", "vb": r"$L_{\mathrm{vb}}$",
                "grad_norm": r"gradient norm $\|g\|_2$"}
# Points per smoothing window: a trailing mean over steps / SMOOTHING steps.
SMOOTHING = 50


def smooth(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, trailing mean over a window of len / SMOOTHING steps); steps count from 1."""
    window = max(1, len(values) // SMOOTHING)
    kernel = np.ones(window) / window
    return np.arange(window, len(values) + 1), np.convolve(values, kernel, mode="valid")


def training_runs(study: Study) -> list[tuple[str, int, str]]:
    """(recipe, seed, label) of every run the report reads a train.h5 of: the study's and the control's."""
    runs = [(recipe, seed, study.label(recipe)) for recipe in study.recipes for seed in study.seeds_of(recipe)]
    control = study.negative_control_recipe
    runs += [(control, seed, f"{study.label(control)}, negative control") for seed in study.negative_control_seeds]
    return runs


def training_curves(study: Study, data: Collected, choices: Choices) -> Figure:
    title = f"Training curves: every run, trailing mean over 1/{SMOOTHING} of the steps"
    colours = _colours(study)
    fig = Figure(figsize=(max(8.0, 5.0 * len(study.datasets) + 1.0), 2.6 * len(TRAINING_CURVES) + 1.6),
                 layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(TRAINING_CURVES), len(study.datasets), squeeze=False, sharex="col")
    labelled: dict[str, object] = {}
    for col, dataset in enumerate(study.datasets):
        for recipe, seed, label in training_runs(study):
            curves = read_training_curves(layout.train_log(study.results, dataset, recipe, seed))
            control = label.endswith("negative control")
            for row, key in enumerate(TRAINING_CURVES):
                steps, values = smooth(curves[key])
                (line,) = axes[row, col].plot(steps, values, color="0.45" if control else colours[recipe],
                                              linestyle="--" if control else "-", linewidth=0.9)
                labelled.setdefault(label, line)
        axes[0, col].set_title(dataset)
        axes[-1, col].set_xlabel("training step")
        for row, key in enumerate(TRAINING_CURVES):
            axes[row, col].set_ylabel(CURVE_LABELS[key])
            axes[row, col].set_yscale("log")
            axes[row, col].grid(alpha=0.3)
    seeds = ", ".join(map(str, study.seeds))
    fig.legend(list(labelled.values()), list(labelled), loc="outside lower center", fontsize=8,
               ncol=min(2, len(labelled)), title=f"one line per run: study seeds {seeds}", title_fontsize=8)
    return fig


FIGURE_BUILDERS: dict[str, Callable[[Study, Collected, Choices], Figure]] = {
    "fig1_loss_surface": fig1_loss_surface,
    "fig2_samples_fp32_int8": fig2_samples,
    "fig5_loss_vs_perturbation": fig5_loss_vs_perturbation,
    "fig6_eps_norm": fig6_eps_norm,
    "training_curves": training_curves,
}


def sample_rows(study: Study, choices: Choices) -> list[tuple[str, str, str]]:
    """(dataset, recipe, average) of Fig. 2's rows: raw weights, and the EMA weights as Fig. 4 adds."""
    rows = []
    for dataset in study.datasets:
        for recipe in _featured(study, choices, dataset):
            for average in [a for a in ("none", "ema") if a in study.averages and study.seeds_of(recipe, a)]:
                # fSGLD is this project's extension: its raw weights suffice beside the paper's rows.
                if average == "ema" and study.recipe(recipe).kind == "fsgld":
                    continue
                rows.append((dataset, recipe, average))
    return rows


def _seed_words(seeds: set[int]) -> str:
    return f"training seed {next(iter(seeds))}" if len(seeds) == 1 else "first training seed of each row's recipe"


def samples_needed(study: Study, choices: Choices) -> list[str]:
    """The samples.h5 files Fig. 2 reads (first training seed)."""
    return [layout.samples(study.results, dataset, recipe, study.seeds_of(recipe, average)[0], average, precision,
                           steps)
            for dataset, recipe, average in sample_rows(study, choices)
            for precision, steps in sample_columns(study) if study.scored(average, precision, steps)]
