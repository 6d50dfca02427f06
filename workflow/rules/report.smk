# Report: one summary per run (summary.json, summary.md, plots) over every head run.


def head_metrics(w):
    return [
        f"results/{w.run}/heads/{h}/{f}/{s}/seed{k}/metrics.json" for (h, f, s, k) in head_jobs(w.run)
    ]


rule summary:
    input:
        metrics=head_metrics,
        manifest=R + "/manifest.parquet",
    output:
        json=R + "/summary.json",
        md=report(R + "/summary.md", category="4. Heads", caption="../report/summary.rst"),
        plots=report(
            directory(R + "/plots"),
            patterns=["{name}.png"],
            category="4. Heads",
            caption="../report/plots.rst",
        ),
    params:
        code=fingerprint("report"),
    log:
        R + "/logs/summary.log",
    shell:
        "{AVEPIPE} summarize --run {wildcards.run} --out-dir results/{wildcards.run} {input.metrics} > {log} 2>&1"
