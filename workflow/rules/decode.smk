# Decode: one job per shard (the unit of work, resume and cluster job), then the manifest
# and the decode report.


rule decode:
    input:
        index=R + "/index.parquet",
    output:
        directory(R + "/decoded/shard-{shard}.zarr"),
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
        R + "/logs/decode/shard-{shard}.log",
    shell:
        "{AVEPIPE} decode --index {input.index} --shard {wildcards.shard} --out {output}"
        " --n-segments {params.n_segments} --rates {params.rates}"
        " --sample-frames {params.sample_frames} --seed {params.seed} --on-error {params.on_error}"
        " --no-progress > {log} 2>&1"


rule decode_report:
    input:
        index=R + "/index.parquet",
        problems=R + "/index_problems.json",
        shards=lambda w: expand(R + "/decoded/shard-{shard}.zarr", run=w.run, shard=shards(w.run)),
    output:
        manifest=R + "/manifest.parquet",
        md=report(R + "/decode_report.md", category="1. Decode", caption="../report/decode.rst"),
        json=R + "/decode_report.json",
        png=report(R + "/decode_report.png", category="1. Decode", caption="../report/decode.rst"),
    params:
        code=fingerprint("decode_report"),
    log:
        R + "/logs/decode_report.log",
    shell:
        "{AVEPIPE} decode-report --index {input.index} --problems {input.problems}"
        " --out-dir results/{wildcards.run} {input.shards} > {log} 2>&1"
