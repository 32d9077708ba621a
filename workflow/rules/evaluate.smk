# Every weights variant (average x precision): quantized copy, samples at each T', FID; and the
# flatness / exposure metrics on the fp32 weights of each average.


rule quantize:
    input:
        weights=lambda w: layout.trained_weights(RESULTS, w.dataset, w.recipe, w.seed, w.average),
        code=CODE["quantize"],
    output:
        weights=layout.quantized_weights(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}"),
        codes=layout.quantized_codes(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}"),
    log:
        f"{RESULTS}/logs/quantize/{{dataset}}_{{recipe}}_seed{{seed}}_{{average}}_{{precision}}.log",
    wildcard_constraints:
        precision=QUANTIZED_REGEX,
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    params:
        # {} for min-max precisions, {"quantization": {"clip": c}} for intBclip.
        settings=lambda w: as_settings(stage_settings(config, "quantize", precision=w.precision)),
    shell:
        f"{PIPELINE}quantize --weights {{input.weights:q}} --precision {{wildcards.precision:q}} "
        "--out {output.weights:q} --codes {output.codes:q} --settings {params.settings:q} 2> {log:q}"


# Samples of two kinds, one command: every weights variant at each T' (sample), and the selection
# samples, drawn with another seed, behind the rho of the +SAM rows (sample_validation; see
# report.selection). Each entry: weights, samples, grid, the job's name in its log file, and the
# arguments that set its seed and count (none: the sampling settings').
SELECTION = config["report"]["selection"]
# The study's sample grids appear in the Snakemake report, one per weights variant and T'.
SAMPLE_GRID = report(
    layout.sample_grid(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}", "{steps}"),
    caption="../report/sample_grid.rst",
    category="Samples",
    subcategory="{dataset}",
    labels={
        "recipe": "{recipe}",
        "seed": "{seed}",
        "averaging": "{average}",
        "precision": "{precision}",
        "T'": "{steps}",
    },
)
SAMPLE_JOBS = {
    "sample": (
        variant_weights,
        layout.samples(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}", "{steps}"),
        SAMPLE_GRID,
        "{dataset}_{recipe}_seed{seed}_{average}_{precision}_T{steps}",
        "",
    ),
    "sample_validation": (
        lambda w: layout.trained_weights(RESULTS, w.dataset, w.recipe, w.seed, "none"),
        layout.validation_samples(RESULTS, "{dataset}", "{recipe}", "{seed}", "{steps}"),
        layout.validation_grid(RESULTS, "{dataset}", "{recipe}", "{seed}", "{steps}"),
        "{dataset}_{recipe}_seed{seed}_T{steps}",
        f"--seed {SELECTION['sampling_seed']} --n {SELECTION['n_samples']} ",
    ),
}


for sample_rule, (sample_weights, sample_out, sample_grid, sample_job, sample_draws) in SAMPLE_JOBS.items():

    rule:
        name:
            sample_rule
        input:
            weights=sample_weights,
            code=CODE["sample"],
        output:
            samples=sample_out,
            grid=sample_grid,
        log:
            f"{RESULTS}/logs/{sample_rule}/{sample_job}.log",
        conda:
            "../envs/pipeline.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=60 * 24,
            gpu=1,
        params:
            settings=lambda w: as_settings(stage_settings(config, "sample", dataset=w.dataset)),
            draws=sample_draws,
        shell:
            f"{PIPELINE}sample --weights {{input.weights:q}} --dataset {{wildcards.dataset:q}} "
            "--steps {wildcards.steps:q} --settings {params.settings:q} {params.draws}--out {output.samples:q} "
            "--grid {output.grid:q} --no-progress 2> {log:q}"


# FD of three kinds of samples, one command: the study's samples (fid), the selection samples that
# choose SAM's rho (fid_validation), and the calibration floor and static sets (fid_calibration).
# Each entry: samples, FD file, the job's name in its log file.
FD_JOBS = {
    "fid": (
        layout.samples(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}", "{steps}"),
        layout.fid(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{precision}", "{steps}", "{extractor}"),
        "{dataset}_{recipe}_seed{seed}_{average}_{precision}_T{steps}_{extractor}",
    ),
    "fid_validation": (
        layout.validation_samples(RESULTS, "{dataset}", "{recipe}", "{seed}", "{steps}"),
        layout.validation_fid(RESULTS, "{dataset}", "{recipe}", "{seed}", "{steps}", "{extractor}"),
        "{dataset}_{recipe}_seed{seed}_T{steps}_{extractor}",
    ),
    "fid_calibration": (
        layout.calibration_samples(RESULTS, "{dataset}", "{kind}", "{n}"),
        layout.calibration_fid(RESULTS, "{dataset}", "{kind}", "{n}", "{extractor}"),
        "{dataset}_{kind}_n{n}_{extractor}",
    ),
}


for fd_rule, (fd_samples, fd_out, fd_job) in FD_JOBS.items():

    rule:
        name:
            fd_rule
        input:
            samples=fd_samples,
            reference=layout.fid_reference(RESULTS, "{dataset}", "{extractor}"),
            kid_reference=layout.kid_reference(RESULTS, "{dataset}", "{extractor}"),
            code=CODE["fid"],
        output:
            fd_out,
        log:
            f"{RESULTS}/logs/{fd_rule}/{fd_job}.log",
        conda:
            "../envs/pipeline.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=120,
            gpu=1,
        params:
            settings=lambda w: as_settings(stage_settings(config, "fid", dataset=w.dataset)),
        shell:
            f"{PIPELINE}fid --samples {{input.samples:q}} --reference {{input.reference:q}} "
            "--kid-reference {input.kid_reference:q} --settings {params.settings:q} --out {output:q} "
            "--no-progress 2> {log:q}"


# Which metrics need a GPU on the cluster: all of them run the UNet many times.
rule metric:
    input:
        weights=lambda w: layout.trained_weights(RESULTS, w.dataset, w.recipe, w.seed, w.average),
        data=layout.data(RESULTS, "{dataset}"),
        code=lambda w: CODE[w.metric],
    output:
        layout.metric(RESULTS, "{dataset}", "{recipe}", "{seed}", "{average}", "{metric}"),
    log:
        f"{RESULTS}/logs/metric/{{dataset}}_{{recipe}}_seed{{seed}}_{{average}}_{{metric}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=60 * 12,
        gpu=1,
    params:
        settings=lambda w: as_settings(stage_settings(config, w.metric, dataset=w.dataset)),
    shell:
        f"{PIPELINE}{{wildcards.metric:q}} --weights {{input.weights:q}} --data {{input.data:q}} "
        "--dataset {wildcards.dataset:q} --settings {params.settings:q} --out {output:q} --no-progress 2> {log:q}"
