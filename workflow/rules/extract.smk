# Extract: one job per (encoder, shard) -> a feature shard store; `<enc>_ft` extracts with
# the fine-tuned weights written by the finetune rule.


rule extract:
    input:
        decoded="results/{run}/decoded/shard-{shard}.zarr",
        index="results/{run}/index.parquet",
        weights=extract_weights,
    output:
        directory("results/{run}/features/{enc}/shard-{shard}.zarr"),
    params:
        encoder=lambda w: w.enc.removesuffix("_ft"),
        options=extract_flags,
        code=lambda w: fingerprint(f"extract:{w.enc.removesuffix('_ft')}"),
    threads: lambda w: apcfg.encoder_settings(C(w), w.enc)["threads"]
    # the fine-tuning chain (its partner store, then the `_ft` re-extraction) is the longest
    # path of a run: start it first so heads and other encoders fill the remaining cores
    priority: extract_priority
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    log:
        "results/{run}/logs/extract/{enc}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/extract/{enc}/shard-{shard}.tsv"
    conda:
        GPU_ENV
    shell:
        "avepipe extract --decoded={input.decoded:q} --index={input.index:q} --encoder={params.encoder}"
        " {params.options} --out={output:q} > {log:q} 2>&1"


rule store_summary:
    input:
        encoder_shards,
    output:
        report(
            "results/{run}/features/{enc}/summary.json",
            category="2. Features",
            subcategory="{enc}",
            caption="../report/features.rst",
        ),
    params:
        store=lambda w: f"results/{w.run}/features/{w.enc}",
        code=fingerprint("store"),
    log:
        "results/{run}/logs/store_summary/{enc}.log",
    conda:
        CPU_ENV
    shell:
        "avepipe inspect --json --out={output:q} {params.store:q} > {log:q} 2>&1"
