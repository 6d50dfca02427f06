# Heads: train and evaluate one localization head per (head[@variant], features, setting,
# seed). Model selection on val by default; `train.select_on: test` is the published protocol.


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
        options=train_flags,
        out_dir=lambda w: f"results/{w.run}/heads/{w.head}/{w.features}/{w.setting}/seed{w.seed}",
        code=lambda w: fingerprint(f"heads:{w.head.partition('@')[0]}"),
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
        "avepipe train --manifest={input.manifest:q} --head={wildcards.head:q} --setting={wildcards.setting}"
        " --seed={wildcards.seed} {params.options} --threads={threads}"
        " --visual {input.visual:q} --audio {input.audio:q} --features-name={wildcards.features:q}"
        " --out-dir={params.out_dir:q} > {log:q} 2>&1"
