# Fine-tune: InfoNCE audio-visual contrast (CACE-Net §3.4) on train (+val) videos only;
# the weights are saved in the encoder's official layout and re-extracted as `<enc>_ft`.
# `finetune.side` visual / audio: rule `finetune`, {enc} = the trained encoder, the other
# side's features read from its store; side both: rule `finetune_both`, one job, both encoders.


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
        base_weights=lambda w: apcfg.encoder_settings(C(w), w.enc)["weights"],
        side=ft_opt("side"),
        temperature=ft_opt("temperature"),
        epochs=ft_opt("epochs"),
        lr=ft_opt("lr"),
        momentum=ft_opt("momentum"),
        wd=ft_opt("weight_decay"),
        milestones=lambda w: ",".join(map(str, C(w)["finetune"]["milestones"])),
        batch=ft_opt("batch_size"),
        proj=ft_opt("proj_dim"),
        trainable=ft_opt("trainable"),
        include_val=lambda w: "--include-val" if C(w)["finetune"]["include_val"] else "",
        seed=lambda w: C(w)["seed"],
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
        "avepipe finetune --manifest {input.manifest} --encoder {wildcards.enc}"
        " --base-weights {params.base_weights} --side {params.side} --temperature {params.temperature}"
        " --epochs {params.epochs} --lr {params.lr} --momentum {params.momentum} --weight-decay {params.wd}"
        " --milestones {params.milestones} --batch-size {params.batch} --proj-dim {params.proj}"
        " --trainable {params.trainable} {params.include_val} --seed {params.seed} --threads {threads}"
        " --partner-store {input.partner} --decoded {input.decoded}"
        " --out-dir {params.out_dir} > {log} 2>&1"


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
        base_weights=lambda w: apcfg.encoder_settings(C(w), w.visual)["weights"],
        audio_base_weights=lambda w: apcfg.encoder_settings(C(w), w.audio)["weights"],
        side=ft_opt("side"),
        temperature=ft_opt("temperature"),
        epochs=ft_opt("epochs"),
        lr=ft_opt("lr"),
        momentum=ft_opt("momentum"),
        wd=ft_opt("weight_decay"),
        milestones=lambda w: ",".join(map(str, C(w)["finetune"]["milestones"])),
        batch=ft_opt("batch_size"),
        proj=ft_opt("proj_dim"),
        trainable=ft_opt("trainable"),
        include_val=lambda w: "--include-val" if C(w)["finetune"]["include_val"] else "",
        seed=lambda w: C(w)["seed"],
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
        "avepipe finetune --manifest {input.manifest} --side both"
        " --encoder {wildcards.visual} --base-weights {params.base_weights}"
        " --audio-encoder {wildcards.audio} --audio-base-weights {params.audio_base_weights}"
        " --temperature {params.temperature}"
        " --epochs {params.epochs} --lr {params.lr} --momentum {params.momentum} --weight-decay {params.wd}"
        " --milestones {params.milestones} --batch-size {params.batch} --proj-dim {params.proj}"
        " --trainable {params.trainable} {params.include_val} --seed {params.seed} --threads {threads}"
        " --decoded {input.decoded} --out-dir {params.out_dir} > {log} 2>&1"
