# The paper's tables and figures (+ fSGLD rows) from every FID, metric and training log.


rule report:
    input:
        **report_inputs(),
    output:
        tables=[report(path, category="Tables") for path in layout.report_tables(RESULTS)],
        figures=[report(path, category="Figures") for path in layout.report_figures(RESULTS)],
        index=report(layout.report_index(RESULTS), category="Index"),
    params:
        settings=as_json(stage_settings(config, "report")),
        out_dir=lambda w, output: os.path.dirname(output.index),
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline report --settings-json {params.settings:q} "
        "--out-dir {params.out_dir:q} 2> {log:q}"
