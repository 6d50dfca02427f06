# Dataset: generate the synthetic demo data (when configured) and build the sample index.


rule synth:
    output:
        "results/{run}/synth.json",
    params:
        format=lambda w: C(w)["data"]["format"],
        root=lambda w: C(w)["data"]["root"],
        videos=lambda w: C(w)["data"]["synthetic"]["videos"],
        classes=lambda w: C(w)["data"]["synthetic"].get("classes", 4),
        seed=lambda w: C(w)["data"]["synthetic"].get("seed", C(w)["seed"]),
        durations=lambda w: "{} {}".format(
            C(w)["data"]["synthetic"].get("min_duration", 20),
            C(w)["data"]["synthetic"].get("max_duration", 60),
        ),
        code=fingerprint("synth"),
    log:
        "results/{run}/logs/synth.log",
    conda:
        CPU_ENV
    shell:
        "avepipe synth --format {params.format} --out {params.root} --videos {params.videos}"
        " --classes {params.classes} --seed {params.seed} --durations {params.durations}"
        " --summary {output} --no-progress > {log} 2>&1"


rule index:
    input:
        index_input,
    output:
        index="results/{run}/index.parquet",
        problems="results/{run}/index_problems.json",
    params:
        format=lambda w: C(w)["data"]["format"],
        root=lambda w: C(w)["data"]["root"],
        shards=lambda w: C(w)["decode"]["shards"],
        on_error=lambda w: C(w)["data"]["on_error"],
        code=fingerprint("index"),
    log:
        "results/{run}/logs/index.log",
    conda:
        CPU_ENV
    shell:
        "avepipe index --format {params.format} --root {params.root} --shards {params.shards}"
        " --on-error {params.on_error} --out {output.index} --problems {output.problems} > {log} 2>&1"
