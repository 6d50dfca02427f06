# Dataset: generate the synthetic demo data (when configured) and build the sample index.


rule synth:
    output:
        "results/{run}/synth.json",
    params:
        format=lambda w: C(w)["data"]["format"],
        root=lambda w: C(w)["data"]["root"],
        options=lambda w: flags(O.SynthOptions, synth_section(w)),
        code=fingerprint("synth"),
    log:
        "results/{run}/logs/synth.log",
    benchmark:
        "results/{run}/benchmarks/synth.tsv"
    conda:
        CPU_ENV
    shell:
        "avepipe synth --format={params.format:q} --out={params.root:q} {params.options}"
        " --summary={output:q} > {log:q} 2>&1"


rule index:
    input:
        index_input,
    output:
        index="results/{run}/index.parquet",
        problems="results/{run}/index_problems.json",
    params:
        options=lambda w: flags(O.IndexOptions, C(w)["data"]),
        shards=lambda w: C(w)["decode"]["shards"],
        code=fingerprint("index"),
    log:
        "results/{run}/logs/index.log",
    conda:
        CPU_ENV
    shell:
        "avepipe index {params.options} --shards={params.shards}"
        " --out={output.index:q} --problems={output.problems:q} > {log:q} 2>&1"
