# Datasets: raw source -> results/{dataset}/data.h5 -> FID reference statistics, and the
# calibration images (held-out real images, noise) whose FD frames the models' FD.


rule prepare:
    input:
        code=CODE["prepare"],
    output:
        layout.data(RESULTS, "{dataset}"),
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        settings=lambda w: as_settings(stage_settings(config, "prepare", dataset=w.dataset)),
    shell:
        f"{PIPELINE}prepare --dataset {{wildcards.dataset:q}} --settings {{params.settings:q}} "
        "--out {output:q} --no-progress 2> {log:q}"


rule fid_reference:
    input:
        data=layout.data(RESULTS, "{dataset}"),
        code=CODE["fid_reference"],
    output:
        layout.fid_reference(RESULTS, "{dataset}", "{extractor}"),
    log:
        f"{RESULTS}/logs/fid_reference/{{dataset}}_{{extractor}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        settings=lambda w: as_settings(stage_settings(config, "fid_reference", dataset=w.dataset)),
    shell:
        f"{PIPELINE}fid-reference --data {{input.data:q}} --extractor {{wildcards.extractor:q}} "
        "--settings {params.settings:q} --out {output:q} --no-progress 2> {log:q}"


# The reference's share of every KID bootstrap, once for all the fid jobs (pipeline/stages/kid_reference.py).
rule kid_reference:
    input:
        reference=layout.fid_reference(RESULTS, "{dataset}", "{extractor}"),
        code=CODE["kid_reference"],
    output:
        layout.kid_reference(RESULTS, "{dataset}", "{extractor}"),
    log:
        f"{RESULTS}/logs/kid_reference/{{dataset}}_{{extractor}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    params:
        settings=lambda w: as_settings(stage_settings(config, "kid_reference", dataset=w.dataset)),
    shell:
        f"{PIPELINE}kid-reference --reference {{input.reference:q}} --settings {{params.settings:q}} "
        "--out {output:q} 2> {log:q}"


rule calibration_samples:
    input:
        data=layout.data(RESULTS, "{dataset}"),
        code=CODE["calibration_samples"],
    output:
        layout.calibration_samples(RESULTS, "{dataset}", "{kind}", "{n}"),
    log:
        f"{RESULTS}/logs/calibration_samples/{{dataset}}_{{kind}}_n{{n}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    params:
        settings=lambda w: as_settings(stage_settings(config, f"calibration_{w.kind}", dataset=w.dataset)),
        seed=config["sampling"]["seed"],
    shell:
        f"{PIPELINE}calibration-samples --data {{input.data:q}} --kind {{wildcards.kind:q}} "
        "--n {wildcards.n:q} --seed {params.seed} --settings {params.settings:q} --out {output:q} 2> {log:q}"
