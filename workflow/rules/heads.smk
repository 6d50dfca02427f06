# Heads: train and evaluate one localization head per (head, features, setting, seed).
# Model selection on val by default; `train.select_on: test` is the published protocol.


def feature_shards(w, which):
    enc = w.features.split("+")[0 if which == "visual" else 1]
    return expand(R + "/features/{enc}/shard-{shard}.zarr", run=w.run, enc=enc, shard=shards(w.run))


def head_opt(key, default=None):
    def get(w):
        return C(w)["heads"][w.head].get(key, default)

    return get


rule train:
    input:
        manifest=R + "/manifest.parquet",
        visual=lambda w: feature_shards(w, "visual"),
        audio=lambda w: feature_shards(w, "audio"),
    output:
        metrics=R + "/heads/{head}/{features}/{setting}/seed{seed}/metrics.json",
        ckpt=R + "/heads/{head}/{features}/{setting}/seed{seed}/checkpoint.pt",
        log=R + "/heads/{head}/{features}/{setting}/seed{seed}/log.jsonl",
    params:
        format=lambda w: C(w)["data"]["format"],
        epochs=lambda w: head_opt("epochs", "")(w) and f"--epochs {head_opt('epochs')(w)}",
        batch=lambda w: head_opt("batch_size", "")(w) and f"--batch-size {head_opt('batch_size')(w)}",
        lr=lambda w: head_opt("lr", "")(w) and f"--lr {head_opt('lr')(w)}",
        hparams=lambda w: " ".join(f"--hparam {k}={v}" for k, v in sorted(head_opt("hparams", {})(w).items())),
        select_on=lambda w: C(w)["train"]["select_on"],
        normalize=lambda w: C(w)["train"]["normalize"],
        device=lambda w: C(w)["train"]["device"],
        evaluate=lambda w: " ".join(f"--eval {k}={v}" for k, v in sorted(C(w).get("evaluate", {}).items())),
        code=lambda w: fingerprint("heads:" + w.head),
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=600,
    log:
        R + "/logs/heads/{head}/{features}/{setting}/seed{seed}.log",
    benchmark:
        R + "/benchmarks/heads/{head}/{features}/{setting}/seed{seed}.tsv"
    shell:
        "{AVEPIPE} train --format {params.format} --manifest {input.manifest} --head {wildcards.head}"
        " --setting {wildcards.setting} --seed {wildcards.seed} {params.epochs} {params.batch} {params.lr}"
        " {params.hparams} {params.evaluate} --select-on {params.select_on} --normalize {params.normalize}"
        " --device {params.device}"
        " --threads {threads} --visual {input.visual} --audio-features {input.audio}"
        " --features-name {wildcards.features}"
        " --out-dir results/{wildcards.run}/heads/{wildcards.head}/{wildcards.features}/{wildcards.setting}/seed{wildcards.seed}"
        " --no-progress > {log} 2>&1"
