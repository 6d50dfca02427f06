# Extract: one job per (encoder, shard) -> a feature shard store; `<enc>_ft` extracts with
# the fine-tuned weights written by the finetune rule.
#
# Shared decoding: when two or more visual stores of a run read the same shards, a `frames`
# job per shard decodes each video once and keeps, for each distinct frame recipe, the
# chosen frames resized to uint8 224x224 (avepipe/frames.py); those extract jobs read their
# recipe from there. Once every reader of a shard has finished, `frames_done` empties the
# store (the data are large: about 24 MB per AVE video and recipe at 16 fps) and keeps its
# folder; an extract job rerun later on its own (e.g. a changed batch_size) finds no data
# there and decodes the videos itself. How this keeps reruns to what changed:
# - the frames store is an `ancient` input of the extract jobs, so writing it again never
#   reruns a store that is otherwise up to date;
# - the `frames` job has no params and no code fingerprint: it learns the recipes from one
#   small file per reader, `frames/readers/<enc>.json` (an `ancient` input), written by
#   `frames_reader` with ALL the params of that reader's extract jobs, and each extract job
#   reads its own file as a plain input. A changed option of one encoder reruns its
#   reader file and so its extract jobs, never the frames job. (Snakemake does not
#   evaluate a job whose ancestor must rerun and which it reaches only through `ancient`
#   inputs (snakemake/snakemake#4166): a frames job with the recipes as params would hide
#   the changed encoder's own params change.)
# Snakemake's `temp()` would not do: a deleted temp input makes every job that reads it
# rerun whenever the frames job has to run again for one of them.
include: "extract_functions.smk"


rule frames_reader:
    output:
        "results/{run}/frames/readers/{enc}.json",
    params:
        settings=reader_settings,
    log:
        "results/{run}/logs/frames/readers/{enc}.log",
    conda:
        CPU_ENV
    shell:
        "printf '%s\\n' {params.settings:q} > {output:q} 2> {log:q}"


rule frames:
    input:
        decoded="results/{run}/decoded/shard-{shard}.zarr",
        index="results/{run}/index.parquet",
        readers=frames_reader_files,
    output:
        directory("results/{run}/frames/shard-{shard}.zarr"),
    threads: frames_threads
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        "results/{run}/logs/frames/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/frames/shard-{shard}.tsv"
    conda:
        CPU_ENV
    shell:
        "avepipe frames --decoded={input.decoded:q} --index={input.index:q} --readers {input.readers:q}"
        " --workers={threads} --out={output:q} > {log:q} 2>&1"


rule frames_done:
    input:
        frames_done_input,
    output:
        "results/{run}/frames/shard-{shard}.done",
    params:
        store=frames_store,
    log:
        "results/{run}/logs/frames/shard-{shard}.done.log",
    conda:
        CPU_ENV
    shell:
        # the frame data go, the folder stays (see above); a plain shell job, no interpreter to start
        "( test -d {params.store:q} && find {params.store:q} -mindepth 1 -delete"
        " && echo 'frame data removed: every extraction that reads them has finished;"
        " an extraction rerun on its own decodes its videos itself' > {params.store:q}/EMPTIED"
        " ) > {log:q} 2>&1 && touch {output:q}"


rule extract:
    input:
        decoded="results/{run}/decoded/shard-{shard}.zarr",
        index="results/{run}/index.parquet",
        weights=extract_weights,
        frames=extract_frames,
    output:
        directory("results/{run}/features/{enc}/shard-{shard}.zarr"),
    params:
        encoder=lambda w: w.enc.removesuffix("_ft"),
        options=extract_flags,
        data=extract_data_flags,
        code=lambda w: fingerprint(f"extract:{w.enc.removesuffix('_ft')}"),
    threads: lambda w: apcfg.encoder_settings(C(w), w.enc)["threads"]
    # the fine-tuning chain (its partner store, then the `_ft` re-extraction) is the longest
    # path of a run: start it first so heads and other encoders fill the remaining cores
    priority: extract_rule_priority
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    log:
        "results/{run}/logs/extract/{enc}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/extract/{enc}/shard-{shard}.tsv"
    conda:
        GPU_ENV
    shell:
        "avepipe extract --decoded={input.decoded:q} --index={input.index:q} --encoder={params.encoder}"
        " {params.options} {params.data} --out={output:q} > {log:q} 2>&1"


rule store_summary:
    input:
        shards=encoder_shards,
        frames_done=summary_frames_done,
    output:
        report(
            "results/{run}/features/{enc}/summary.json",
            category="2. Features",
            subcategory="{enc}",
            caption="../report/features.rst",
        ),
    params:
        store=lambda w: f"results/{w.run}/features/{w.enc}",
        code=fingerprint("store"),
    log:
        "results/{run}/logs/store_summary/{enc}.log",
    conda:
        CPU_ENV
    shell:
        "avepipe inspect --json --out={output:q} {params.store:q} > {log:q} 2>&1"
