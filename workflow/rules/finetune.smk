# Fine-tune: InfoNCE audio-visual contrast (CACE-Net §3.4) on train (+val) videos only;
# the weights are saved in the encoder's official layout and re-extracted as `<enc>_ft`.
# `finetune.side` visual / audio: rule `finetune`, {enc} = the trained encoder, the other
# side's features read from its store; side both: rule `finetune_both`, one job, both encoders.
# Both rules pass the whole `finetune` section (finetune_flags) and differ only in files.


rule finetune:
    input:
        manifest="results/{run}/manifest.parquet",
        decoded=decoded_shards,
        partner=ft_partner,
    output:
        weights="results/{run}/finetune/{enc}/weights.pth",
        log="results/{run}/finetune/{enc}/log.jsonl",
        png=report(
            "results/{run}/finetune/{enc}/loss.png",
            category="3. Fine-tuning",
            subcategory="{enc}",
            caption="../report/finetune.rst",
        ),
        prov=report(
            "results/{run}/finetune/{enc}/provenance.json",
            category="3. Fine-tuning",
            subcategory="{enc}",
            caption="../report/finetune_provenance.rst",
        ),
    params:
        options=finetune_flags,
        out_dir=lambda w: f"results/{w.run}/finetune/{w.enc}",
        code=fingerprint("finetune"),
    threads: 2
    priority: 20
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=720,
    log:
        "results/{run}/logs/finetune/{enc}.log",
    benchmark:
        "results/{run}/benchmarks/finetune/{enc}.tsv"
    conda:
        GPU_ENV
    shell:
        "avepipe finetune --manifest={input.manifest:q} {params.options} --threads={threads}"
        " --partner-store {input.partner:q} --decoded {input.decoded:q}"
        " --out-dir={params.out_dir:q} > {log:q} 2>&1"


rule finetune_both:
    input:
        manifest="results/{run}/manifest.parquet",
        decoded=decoded_shards,
    output:
        visual="results/{run}/finetune/{visual}+{audio}/{visual}.pth",
        audio="results/{run}/finetune/{visual}+{audio}/{audio}.pth",
        log="results/{run}/finetune/{visual}+{audio}/log.jsonl",
        png=report(
            "results/{run}/finetune/{visual}+{audio}/loss.png",
            category="3. Fine-tuning",
            subcategory="{visual}+{audio}",
            caption="../report/finetune_both.rst",
        ),
        prov=report(
            "results/{run}/finetune/{visual}+{audio}/provenance.json",
            category="3. Fine-tuning",
            subcategory="{visual}+{audio}",
            caption="../report/finetune_provenance_both.rst",
        ),
    wildcard_constraints:
        visual="[a-z0-9]+",
        audio="[a-z0-9]+",
    params:
        options=finetune_flags,
        out_dir=lambda w: f"results/{w.run}/finetune/{w.visual}+{w.audio}",
        code=fingerprint("finetune"),
    threads: 2
    priority: 20
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=720,
    log:
        "results/{run}/logs/finetune/{visual}+{audio}.log",
    benchmark:
        "results/{run}/benchmarks/finetune/{visual}+{audio}.tsv"
    conda:
        GPU_ENV
    shell:
        "avepipe finetune --manifest={input.manifest:q} {params.options} --threads={threads}"
        " --decoded {input.decoded:q} --out-dir={params.out_dir:q} > {log:q} 2>&1"
