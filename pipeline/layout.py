"""Where every artifact lives: paths are pure functions of the wildcards.

The Snakefile builds its patterns from these functions (passing "{dataset}" and so on), and the
report finds its inputs with the same functions, so the two can never disagree.
"""

from __future__ import annotations

WEIGHT_FILES = {"none": "weights_raw.pt", "ema": "weights_ema.pt", "swa": "weights_swa.pt"}


def dataset_dir(results: str, dataset: str) -> str:
    return f"{results}/{dataset}"


def data(results: str, dataset: str) -> str:
    return f"{dataset_dir(results, dataset)}/data.h5"


def fid_reference(results: str, dataset: str, extractor: str) -> str:
    return f"{dataset_dir(results, dataset)}/fid_ref_{extractor}.h5"


def kid_reference(results: str, dataset: str, extractor: str) -> str:
    """The reference's KID bootstrap terms (stage kid-reference), beside fid_reference."""
    return f"{dataset_dir(results, dataset)}/kid_ref_{extractor}.h5"


CALIBRATION_KINDS = ("floor", "static")


def calibration_dir(results: str, dataset: str, kind: str, n: int | str) -> str:
    """Reference points of the FID-proxy: held-out real images (floor) or noise (static), N images."""
    return f"{dataset_dir(results, dataset)}/calibration/{kind}/n{n}"


def calibration_samples(results: str, dataset: str, kind: str, n: int | str) -> str:
    return f"{calibration_dir(results, dataset, kind, n)}/samples.h5"


def calibration_fid(results: str, dataset: str, kind: str, n: int | str, extractor: str) -> str:
    return f"{calibration_dir(results, dataset, kind, n)}/fid_{extractor}.h5"


def run_dir(results: str, dataset: str, recipe: str, seed: int | str) -> str:
    return f"{dataset_dir(results, dataset)}/{recipe}/seed{seed}"


def trained_weights(results: str, dataset: str, recipe: str, seed: int | str, average: str) -> str:
    """The train stage's output for one average (none = raw weights)."""
    return f"{run_dir(results, dataset, recipe, seed)}/{WEIGHT_FILES[average]}"


def train_log(results: str, dataset: str, recipe: str, seed: int | str) -> str:
    return f"{run_dir(results, dataset, recipe, seed)}/train.h5"


def variant_dir(results: str, dataset: str, recipe: str, seed: int | str, average: str,
                precision: str) -> str:
    return f"{run_dir(results, dataset, recipe, seed)}/{average}/{precision}"


def quantized_weights(results, dataset, recipe, seed, average, precision) -> str:
    return f"{variant_dir(results, dataset, recipe, seed, average, precision)}/weights.pt"


def quantized_codes(results, dataset, recipe, seed, average, precision) -> str:
    return f"{variant_dir(results, dataset, recipe, seed, average, precision)}/codes.h5"


def weights(results, dataset, recipe, seed, average, precision) -> str:
    """The weights a (average, precision) variant is evaluated with."""
    if precision == "fp32":
        return trained_weights(results, dataset, recipe, seed, average)
    return quantized_weights(results, dataset, recipe, seed, average, precision)


def samples_dir(results, dataset, recipe, seed, average, precision, steps) -> str:
    return f"{variant_dir(results, dataset, recipe, seed, average, precision)}/T{steps}"


def samples(results, dataset, recipe, seed, average, precision, steps) -> str:
    return f"{samples_dir(results, dataset, recipe, seed, average, precision, steps)}/samples.h5"


def sample_grid(results, dataset, recipe, seed, average, precision, steps) -> str:
    return f"{samples_dir(results, dataset, recipe, seed, average, precision, steps)}/grid.png"


def fid(results, dataset, recipe, seed, average, precision, steps, extractor) -> str:
    return f"{samples_dir(results, dataset, recipe, seed, average, precision, steps)}/fid_{extractor}.h5"


def validation_samples(results, dataset, recipe, seed, steps) -> str:
    """Samples of the raw fp32 weights drawn with the selection seed: they choose SAM's rho, so the
    numbers the claims test (drawn with sampling.seed) play no part in the choice."""
    return f"{samples_dir(results, dataset, recipe, seed, 'none', 'fp32', steps)}/validation/samples.h5"


def validation_grid(results, dataset, recipe, seed, steps) -> str:
    return f"{samples_dir(results, dataset, recipe, seed, 'none', 'fp32', steps)}/validation/grid.png"


def validation_fid(results, dataset, recipe, seed, steps, extractor) -> str:
    return f"{samples_dir(results, dataset, recipe, seed, 'none', 'fp32', steps)}/validation/fid_{extractor}.h5"


def metric(results, dataset, recipe, seed, average, name) -> str:
    """Flatness and exposure metrics are measured on the fp32 weights of each average."""
    return f"{run_dir(results, dataset, recipe, seed)}/{average}/metrics/{name}.h5"


def report_dir(results: str) -> str:
    return f"{results}/report"


REPORT_TABLES = ("table1_adm_vs_sam", "table2_fid", "table3_lpf", "table4_quantization",
                 "rho_sweep", "claims", "power")
REPORT_FIGURES = ("fig1_loss_surface", "fig2_samples_fp32_int8", "fig5_loss_vs_perturbation",
                  "fig6_eps_norm", "training_curves")


# How the Snakemake HTML report names each table and figure (its label, shown instead of the path).
REPORT_TITLES = {
    "table1_adm_vs_sam": "Table 1: ADM vs +SAM",
    "table2_fid": "Table 2: FD and KID",
    "table3_lpf": "Tables 3 and 5: flatness",
    "table4_quantization": "Table 4: quantization",
    "rho_sweep": "SAM's rho sweep",
    "claims": "Claims: effects and verdicts",
    "power": "Power: seeds needed per claim",
    "fig1_loss_surface": "Fig. 1: loss surfaces",
    "fig2_samples_fp32_int8": "Figs. 2 and 4: samples fp32 and quantized",
    "fig5_loss_vs_perturbation": "Figs. 5, 7, 8: loss vs perturbation",
    "fig6_eps_norm": "Figs. 6, 7, 8: eps-norm",
    "training_curves": "Training curves",
    "index": "The report (answers, claims, tables, figures)",
}


def report_tables(results: str) -> list[str]:
    """Every table of the report, each as CSV, Markdown, LaTeX and HTML (the one the HTML report shows)."""
    return [f"{report_dir(results)}/{name}.{ext}" for name in REPORT_TABLES for ext in ("csv", "md", "tex", "html")]


def report_figures(results: str) -> list[str]:
    """Every figure of the report, each as PNG, PDF and an HTML page with its caption (the one the HTML report shows)."""
    return [f"{report_dir(results)}/{name}.{ext}" for name in REPORT_FIGURES for ext in ("png", "pdf", "html")]


def report_index(results: str) -> str:
    """The report's index: what each table and figure is, and the open choices of the study."""
    return f"{report_dir(results)}/index.md"


def report_index_html(results: str) -> str:
    """index.md's content as HTML, for the Snakemake HTML report."""
    return f"{report_dir(results)}/index.html"
