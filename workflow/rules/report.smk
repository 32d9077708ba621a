# The paper's tables and figures (+ fSGLD rows) from every FID, metric and training log.


def report_inputs():
    fids, metrics, logs, samples = [], [], [], []
    for v in all_variants():
        for steps in STUDY["sampling_steps"]:
            fids.append(layout.fid(RESULTS, *v.values(), steps, EXTRACTOR))
        # Figs. 2 and 4 show samples at the smallest T'.
        samples.append(layout.samples(RESULTS, *v.values(), min(STUDY["sampling_steps"])))
    for run in all_runs():
        logs.append(layout.train_log(RESULTS, *run.values()))
        for average in STUDY["averages"]:
            for name in STUDY["metrics"]:
                metrics.append(layout.metric(RESULTS, *run.values(), average, name))
    return dict(fid=fids, metrics=metrics, logs=logs, samples=samples, code=CODE["report"])


def report_outputs():
    return layout.report_tables(RESULTS) + layout.report_figures(RESULTS) + [layout.report_index(RESULTS)]


rule report:
    input:
        **report_inputs(),
    output:
        tables=[report(path, category="Tables") for path in layout.report_tables(RESULTS)],
        figures=[report(path, category="Figures") for path in layout.report_figures(RESULTS)],
        index=report(layout.report_index(RESULTS), category="Index"),
    params:
        settings=as_json(stage_settings(config, "report")),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m pipeline report --settings-json '{params.settings}' "
        "--out-dir {RESULTS}/report 2> {log}"
