# The paper's tables and figures (+ fSGLD rows) from every FID, metric and training log.


rule report:
    input:
        **report_inputs(),
    output:
        # The HTML report shows the .html tables and figure pages (image and caption) inline;
        # the CSV, Markdown, LaTeX, PNG and PDF copies stay in the report folder only.
        tables=[html_report_item(path, "Tables") for path in layout.report_tables(RESULTS)],
        figures=[
            html_report_item(path, "Figures") if path.endswith(".html") else path
            for path in layout.report_figures(RESULTS)
        ],
        index=layout.report_index(RESULTS),
        index_html=html_report_item(layout.report_index_html(RESULTS), "Index"),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    params:
        settings=as_settings(stage_settings(config, "report")),
        out_dir=lambda w, output: os.path.dirname(output.index),
    shell:
        f"{PIPELINE}report --settings {{params.settings:q}} --out-dir {{params.out_dir:q}} 2> {{log:q}}"
