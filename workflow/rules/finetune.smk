# Fine-tune: InfoNCE audio-visual contrast (CACE-Net §3.4) on train (+val) videos only;
# the weights are saved in the encoder's official layout and re-extracted as `<enc>_ft`.


rule finetune:
    input:
        manifest=R + "/manifest.parquet",
        decoded=lambda w: expand(R + "/decoded/shard-{shard}.zarr", run=w.run, shard=shards(w.run)),
        audio=lambda w: expand(
            R + "/features/{enc}/shard-{shard}.zarr", run=w.run, enc=C(w)["finetune"]["audio"], shard=shards(w.run)
        ),
    output:
        weights=R + "/finetune/{enc}/weights.pth",
        log=R + "/finetune/{enc}/log.jsonl",
        png=report(R + "/finetune/{enc}/loss.png", category="3. Fine-tuning", caption="../report/finetune.rst"),
        prov=R + "/finetune/{enc}/provenance.json",
    params:
        base_weights=lambda w: apcfg.encoder_settings(C(w), w.enc)["weights"],
        side=lambda w: C(w)["finetune"]["side"],
        temperature=lambda w: C(w)["finetune"]["temperature"],
        epochs=lambda w: C(w)["finetune"]["epochs"],
        lr=lambda w: C(w)["finetune"]["lr"],
        momentum=lambda w: C(w)["finetune"]["momentum"],
        wd=lambda w: C(w)["finetune"]["weight_decay"],
        milestones=lambda w: ",".join(map(str, C(w)["finetune"]["milestones"])),
        batch=lambda w: C(w)["finetune"]["batch_size"],
        proj=lambda w: C(w)["finetune"]["proj_dim"],
        trainable=lambda w: C(w)["finetune"]["trainable"],
        include_val=lambda w: "--include-val" if C(w)["finetune"]["include_val"] else "",
        seed=lambda w: C(w)["seed"],
        code=fingerprint("finetune"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=720,
    log:
        R + "/logs/finetune/{enc}.log",
    benchmark:
        R + "/benchmarks/finetune/{enc}.tsv"
    shell:
        "{AVEPIPE} finetune --manifest {input.manifest} --encoder {wildcards.enc}"
        " --base-weights {params.base_weights} --side {params.side} --temperature {params.temperature}"
        " --epochs {params.epochs} --lr {params.lr} --momentum {params.momentum} --weight-decay {params.wd}"
        " --milestones {params.milestones} --batch-size {params.batch} --proj-dim {params.proj}"
        " --trainable {params.trainable} {params.include_val} --seed {params.seed} --threads {threads}"
        " --audio-store {input.audio} --decoded {input.decoded}"
        " --out-dir results/{wildcards.run}/finetune/{wildcards.enc} > {log} 2>&1"
