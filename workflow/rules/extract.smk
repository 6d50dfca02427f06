# Extract: one job per (encoder, shard) -> a feature shard store; `<enc>_ft` extracts with
# the fine-tuned weights written by the finetune rule.


def extract_weights(w):
    if w.enc.endswith("_ft"):
        return f"results/{w.run}/finetune/{w.enc.removesuffix('_ft')}/weights.pth"
    return []


def enc_opt(key):
    return lambda w: apcfg.encoder_settings(C(w), w.enc)[key] if key in apcfg.encoder_settings(C(w), w.enc) else ""


def window_arg(w):
    win = C(w).get("windows")
    return f"--window {win['window']} --hop {win['hop']}" if win else ""


rule extract:
    input:
        decoded=R + "/decoded/shard-{shard}.zarr",
        index=R + "/index.parquet",
        weights=extract_weights,
    output:
        directory(R + "/features/{enc}/shard-{shard}.zarr"),
    params:
        encoder=lambda w: w.enc.removesuffix("_ft"),
        weights=lambda w: extract_weights(w) or apcfg.encoder_settings(C(w), w.enc)["weights"],
        frames=enc_opt("frames_per_segment"),
        batch=enc_opt("batch_size"),
        workers=enc_opt("num_workers"),
        dtype=enc_opt("dtype"),
        options=lambda w: " ".join(
            f"--opt {k}={v}"
            for k, v in sorted(apcfg.encoder_settings(C(w), w.enc).items())
            if k in ("preprocessing", "pooled", "pca")
        ),
        windows=window_arg,
        code=lambda w: fingerprint("extract:" + w.enc.removesuffix("_ft")),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    log:
        R + "/logs/extract/{enc}/shard-{shard}.log",
    benchmark:
        R + "/benchmarks/extract/{enc}/shard-{shard}.tsv"
    shell:
        "{AVEPIPE} extract --decoded {input.decoded} --index {input.index} --encoder {params.encoder}"
        " --weights {params.weights} --frames-per-segment {params.frames} --batch-size {params.batch}"
        " --num-workers {params.workers} --dtype {params.dtype} {params.options} {params.windows}"
        " --threads {threads} --out {output} --no-progress > {log} 2>&1"


rule store_summary:
    input:
        lambda w: expand(R + "/features/{enc}/shard-{shard}.zarr", run=w.run, enc=w.enc, shard=shards(w.run)),
    output:
        R + "/features/{enc}/summary.json",
    params:
        code=fingerprint("store"),
    log:
        R + "/logs/store_summary/{enc}.log",
    shell:
        "{AVEPIPE} inspect --json --out {output} results/{wildcards.run}/features/{wildcards.enc} > {log} 2>&1"
