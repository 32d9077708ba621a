# Datasets: raw source -> results/{dataset}/data.h5 -> FID reference statistics.


rule prepare:
    input:
        code=CODE["prepare"],
    output:
        layout.data(RESULTS, "{dataset}"),
    params:
        settings=lambda w: as_json(stage_settings(config, "prepare", dataset=w.dataset)),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline prepare --dataset {wildcards.dataset} --settings-json '{params.settings}' "
        "--out {output} --no-progress 2> {log}"


rule fid_reference:
    input:
        data=layout.data(RESULTS, "{dataset}"),
        code=CODE["fid_reference"],
    output:
        layout.fid_reference(RESULTS, "{dataset}", "{extractor}"),
    params:
        settings=lambda w: as_json(stage_settings(config, "fid_reference", dataset=w.dataset)),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    log:
        f"{RESULTS}/logs/fid_reference/{{dataset}}_{{extractor}}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline fid-reference --data {input.data} --extractor {wildcards.extractor} "
        "--settings-json '{params.settings}' --out {output} --no-progress 2> {log}"
