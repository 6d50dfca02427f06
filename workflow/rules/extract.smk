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
        weights=lambda w: extract_weights(w) or apcfg.encoder_settings(C(w), w.enc)["weights"],
        frames=enc_opt("frames_per_segment"),
        batch=enc_opt("batch_size"),
        workers=enc_opt("num_workers"),
        dtype=enc_opt("dtype"),
        options=encoder_options,
        windows=window_arg,
        code=lambda w: fingerprint(f"extract:{w.enc.removesuffix('_ft')}"),
    threads: enc_opt("threads")
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
        "avepipe extract --decoded {input.decoded} --index {input.index} --encoder {params.encoder}"
        " --weights {params.weights} --frames-per-segment {params.frames} --batch-size {params.batch}"
        " --num-workers {params.workers} --dtype {params.dtype} {params.options} {params.windows}"
        " --threads {threads} --out {output} --no-progress > {log} 2>&1"


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
        "avepipe inspect --json --out {output} {params.store} > {log} 2>&1"
