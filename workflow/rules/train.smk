# One training run per (dataset, recipe, seed): raw, EMA and SWA weights side by side.


rule train:
    input:
        data=layout.data(RESULTS, "{dataset}"),
        code=CODE["train"],
    output:
        raw=f"{layout.run_dir(RESULTS, '{dataset}', '{recipe}', '{seed}')}/{layout.WEIGHT_FILES['none']}",
        ema=f"{layout.run_dir(RESULTS, '{dataset}', '{recipe}', '{seed}')}/{layout.WEIGHT_FILES['ema']}",
        swa=f"{layout.run_dir(RESULTS, '{dataset}', '{recipe}', '{seed}')}/{layout.WEIGHT_FILES['swa']}",
        log=layout.train_log(RESULTS, "{dataset}", "{recipe}", "{seed}"),
    log:
        f"{RESULTS}/logs/train/{{dataset}}_{{recipe}}_seed{{seed}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: TRAIN_THREADS * TRAIN_PROCESSES
    resources:
        mem_mb=16000 * TRAIN_PROCESSES,
        runtime=60 * 24 * 7,
        # One process per GPU; `--set-resources train:gpu=N` changes the count without a rerun.
        gpu=TRAIN_PROCESSES,
        nodes=1,  # torchrun runs the processes of one training run on one node
        # Under SLURM: SIGTERM 10 minutes before the time limit; training checkpoints, exits 75.
        slurm_extra="--signal=TERM@600",
    params:
        settings=lambda w: as_settings(train_settings(config, w.dataset, w.recipe, int(w.seed))),
        out_dir=lambda w: layout.run_dir(RESULTS, w.dataset, w.recipe, w.seed),
    shell:
        f"{PIPELINE}train --dataset {{wildcards.dataset:q}} --recipe {{wildcards.recipe:q}} "
        "--seed {wildcards.seed:q} --settings {params.settings:q} --data {input.data:q} "
        "--out-dir {params.out_dir:q} --processes {resources.gpu} --no-progress 2> {log:q}"
