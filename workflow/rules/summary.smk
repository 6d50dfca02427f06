# Summary: one table per run (summary.json, summary.md, plots) over every head run.


rule summary:
    input:
        metrics=head_metrics,
        manifest="results/{run}/manifest.parquet",
    output:
        json="results/{run}/summary.json",
        md=report(
            "results/{run}/summary.md",
            category="4. Heads",
            subcategory="summary",
            caption="../report/summary.rst",
        ),
        plots=report(
            directory("results/{run}/plots"),
            patterns=["{name}.png"],
            category="4. Heads",
            subcategory="summary",
            caption="../report/plots.rst",
        ),
    params:
        out_dir=lambda w: f"results/{w.run}",
        code=fingerprint("summary"),
    log:
        "results/{run}/logs/summary.log",
    conda:
        CPU_ENV
    shell:
        "avepipe summarize --run={wildcards.run:q} --out-dir={params.out_dir:q} {input.metrics:q} > {log:q} 2>&1"
