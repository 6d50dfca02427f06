# Shared set-up: configuration (validated before any job), runs, targets, fingerprints.
import sys
from pathlib import Path

from snakemake.utils import validate, min_version

min_version("9.0")

import avepipe.config as apcfg
from avepipe.provenance import code_fingerprint

# --configfile replaces the demo default instead of being merged into it.
if not config:

    configfile: "workflow/config/demo.yaml"


# Named errors (key and value) from avepipe, then Snakemake's own validation of the same schema.
apcfg.validate(config, "config")
validate(config, "../schemas/config.schema.yaml")

RUNS = {config["run"]: config}
for _extra in config.get("also", []):
    _c = apcfg.load_config(_extra)
    RUNS[_c["run"]] = _c

# The rules call the package through the interpreter running Snakemake, so a venv
# needs no activation.
AVEPIPE = f"{sys.executable} -m avepipe"
R = "results/{run}"


wildcard_constraints:
    run="[A-Za-z0-9_.-]+",
    shard=r"\d{3}",
    enc="[a-z0-9]+(_ft)?",
    head="[a-z_]+",
    features=r"[a-z0-9_]+\+[a-z0-9_]+",
    setting="full|weak|cml",
    seed=r"\d+",


def C(w):
    """The configuration of the run a job belongs to."""
    return RUNS[w.run]


def shards(run):
    return [f"{i:03d}" for i in range(RUNS[run]["decode"]["shards"])]


def fingerprint(stage):
    # Snakemake does not track imported modules: a hash of the stage's source is a param,
    # so editing one stage's code reruns that stage and its descendants (REFERENCE §8).
    return code_fingerprint(stage)


def head_jobs(run):
    cfg = RUNS[run]
    out = []
    for head, hc in cfg.get("heads", {}).items():
        for feats in hc.get("features") or cfg.get("features", []):
            for setting in hc.get("settings", ["full"]):
                for seed in cfg["train"]["seeds"]:
                    out.append((head, feats, setting, seed))
    return out


def all_targets():
    t = []
    for run, cfg in RUNS.items():
        t.append(f"results/{run}/decode_report.md")
        for enc in apcfg.feature_encoders(cfg):
            t.append(f"results/{run}/features/{enc}/summary.json")
        if cfg.get("heads"):
            t.append(f"results/{run}/summary.md")
    return t
