# Decode: one job per shard (the unit of work, resume and cluster job), then the manifest
# and the decode report.


rule decode:
    input:
        index="results/{run}/index.parquet",
    output:
        directory("results/{run}/decoded/shard-{shard}.zarr"),
    params:
        options=lambda w: flags(O.DecodeOptions, C(w)["decode"]),
        rates=lambda w: " ".join(map(str, apcfg.audio_rates(C(w)))) or "16000",
        seed=lambda w: C(w)["seed"],
        on_error=lambda w: C(w)["data"]["on_error"],
        code=fingerprint("decode"),
    threads: lambda w: C(w)["decode"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        "results/{run}/logs/decode/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/decode/shard-{shard}.tsv"
    conda:
        CPU_ENV
    shell:
        "avepipe decode --index={input.index:q} --shard={wildcards.shard} --out={output:q}"
        # --threads last: the job's threads (decode.threads, or a profile's set-threads) win
        " {params.options} --rates {params.rates} --seed={params.seed} --on-error={params.on_error} --threads={threads}"
        " > {log:q} 2>&1"


rule decode_report:
    input:
        index="results/{run}/index.parquet",
        problems="results/{run}/index_problems.json",
        shards=decoded_shards,
    output:
        manifest="results/{run}/manifest.parquet",
        md=report("results/{run}/decode_report.md", category="1. Decode", caption="../report/decode.rst"),
        json=report("results/{run}/decode_report.json", category="1. Decode", caption="../report/decode.rst"),
        png=report("results/{run}/decode_report.png", category="1. Decode", caption="../report/decode.rst"),
    params:
        out_dir=lambda w: f"results/{w.run}",
        code=fingerprint("decode_report"),
    log:
        "results/{run}/logs/decode_report.log",
    conda:
        CPU_ENV
    shell:
        "avepipe decode-report --index={input.index:q} --problems={input.problems:q}"
        " --out-dir={params.out_dir:q} {input.shards:q} > {log:q} 2>&1"
