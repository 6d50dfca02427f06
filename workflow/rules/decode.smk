# Decode: one job per shard (the unit of work, resume and cluster job), then the manifest
# and the decode report.


rule decode:
    input:
        index="results/{run}/index.parquet",
    output:
        directory("results/{run}/decoded/shard-{shard}.zarr"),
    params:
        n_segments=lambda w: C(w)["decode"]["n_segments"] or 0,
        rates=lambda w: ",".join(map(str, apcfg.audio_rates(C(w)))) or "16000",
        sample_frames=lambda w: C(w)["decode"]["sample_frames_per_segment"],
        seed=lambda w: C(w)["seed"],
        on_error=lambda w: C(w)["data"]["on_error"],
        code=fingerprint("decode"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        "results/{run}/logs/decode/shard-{shard}.log",
    conda:
        CPU_ENV
    shell:
        "avepipe decode --index {input.index} --shard {wildcards.shard} --out {output}"
        " --n-segments {params.n_segments} --rates {params.rates}"
        " --sample-frames {params.sample_frames} --seed {params.seed} --on-error {params.on_error}"
        " --no-progress > {log} 2>&1"


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
        "avepipe decode-report --index {input.index} --problems {input.problems}"
        " --out-dir {params.out_dir} {input.shards} > {log} 2>&1"
