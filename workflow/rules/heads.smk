# Heads: train and evaluate one localization head per (head, features, setting, seed).
# Model selection on val by default; `train.select_on: test` is the published protocol.


rule train:
    input:
        manifest="results/{run}/manifest.parquet",
        visual=lambda w: feature_shards(w, "visual"),
        audio=lambda w: feature_shards(w, "audio"),
    output:
        metrics=report(
            "results/{run}/heads/{head}/{features}/{setting}/seed{seed}/metrics.json",
            category="4. Heads",
            subcategory="{head}",
            labels={"head": "{head}", "features": "{features}", "setting": "{setting}", "seed": "{seed}"},
            caption="../report/metrics.rst",
        ),
        ckpt="results/{run}/heads/{head}/{features}/{setting}/seed{seed}/checkpoint.pt",
        log="results/{run}/heads/{head}/{features}/{setting}/seed{seed}/log.jsonl",
    params:
        format=lambda w: C(w)["data"]["format"],
        epochs=head_flag("epochs", "--epochs"),
        batch=head_flag("batch_size", "--batch-size"),
        lr=head_flag("lr", "--lr"),
        hparams=lambda w: kv_flags("--hparam", head_opt("hparams", {})(w)),
        select_on=lambda w: C(w)["train"]["select_on"],
        normalize=lambda w: C(w)["train"]["normalize"],
        device=lambda w: C(w)["train"]["device"],
        precision=lambda w: C(w)["train"]["precision"],
        evaluate=lambda w: kv_flags("--eval", C(w).get("evaluate", {})),
        out_dir=lambda w: f"results/{w.run}/heads/{w.head}/{w.features}/{w.setting}/seed{w.seed}",
        code=lambda w: fingerprint(f"heads:{w.head}"),
    threads: 1  # small heads: two jobs side by side beat one job on two threads
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=600,
    log:
        "results/{run}/logs/heads/{head}/{features}/{setting}/seed{seed}.log",
    benchmark:
        "results/{run}/benchmarks/heads/{head}/{features}/{setting}/seed{seed}.tsv"
    conda:
        GPU_ENV
    shell:
        "avepipe train --format {params.format} --manifest {input.manifest} --head {wildcards.head}"
        " --setting {wildcards.setting} --seed {wildcards.seed} {params.epochs} {params.batch} {params.lr}"
        " {params.hparams} {params.evaluate} --select-on {params.select_on} --normalize {params.normalize}"
        " --device {params.device} --precision {params.precision}"
        " --threads {threads} --visual {input.visual} --audio-features {input.audio}"
        " --features-name {wildcards.features} --out-dir {params.out_dir} --no-progress > {log} 2>&1"
