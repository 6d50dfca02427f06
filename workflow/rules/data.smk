# Dataset: generate the synthetic demo data (when configured) and build the sample index.


def index_input(w):
    cfg = C(w)
    if cfg["data"].get("synthetic"):
        return f"results/{w.run}/synth.json"
    # a real dataset: its annotation file must exist (the index rule reports the rest)
    root = Path(cfg["data"]["root"])
    if cfg["data"]["format"] == "ave":
        return str(root / "Annotations.txt")
    return str(root / "annotations" / "unav100_annotations.json")


rule synth:
    output:
        R + "/synth.json",
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
        R + "/logs/synth.log",
    shell:
        "{AVEPIPE} synth --format {params.format} --out {params.root} --videos {params.videos}"
        " --classes {params.classes} --seed {params.seed} --durations {params.durations}"
        " --summary {output} --no-progress > {log} 2>&1"


rule index:
    input:
        index_input,
    output:
        index=R + "/index.parquet",
        problems=R + "/index_problems.json",
    params:
        format=lambda w: C(w)["data"]["format"],
        root=lambda w: C(w)["data"]["root"],
        shards=lambda w: C(w)["decode"]["shards"],
        on_error=lambda w: C(w)["data"]["on_error"],
        code=fingerprint("index"),
    log:
        R + "/logs/index.log",
    shell:
        "{AVEPIPE} index --format {params.format} --root {params.root} --shards {params.shards}"
        " --on-error {params.on_error} --out {output.index} --problems {output.problems} > {log} 2>&1"
