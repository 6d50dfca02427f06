# Shared set-up: configuration (validated before any job), runs, targets, fingerprints,
# the `avepipe` command the rules run, and the input/param functions of every rule file.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
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


# --- the `avepipe` command ------------------------------------------------------------------
# Rules run `avepipe <subcommand> ...`: a shell function defined by this prefix. By default it
# is the interpreter running Snakemake (a venv needs no activation). Under
# `--software-deployment-method conda` (or apptainer) it is the `python` of the rule's
# environment, with this checkout importable; PYTHONPATH is exported inside the job because
# Snakemake drops an outer PYTHONPATH when it activates a conda env. The prefix is not part
# of a rule's code, so switching interpreters does not rerun finished jobs.
_ISOLATED = bool({DeploymentMethod.CONDA, DeploymentMethod.APPTAINER} & set(workflow.deployment_settings.deployment_method))
if _ISOLATED:
    _PYTHON = f"export PYTHONPATH={shlex.quote(workflow.basedir)}; python"
else:
    _PYTHON = shlex.quote(sys.executable)
# (doubled braces: Snakemake formats the prefix like a shell command)
shell.prefix(f'set -euo pipefail; avepipe() {{{{ {_PYTHON} -m avepipe "$@"; }}}}; ')

# Conda environments of the rules (`--software-deployment-method conda`): CPU rules use
# envs/cpu.yaml; rules that can use a GPU (extract, finetune, train) envs/cuda.yaml, or
# envs/cpu.yaml too when AVEPIPE_CONDA_GPU=0. Paths are relative to workflow/rules/.
CPU_ENV = "../../envs/cpu.yaml"
GPU_ENV = "../../envs/cpu.yaml" if os.environ.get("AVEPIPE_CONDA_GPU", "1") == "0" else "../../envs/cuda.yaml"


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
            # each head run is a result in its own right (deleting one reruns it), the summary over them
            t += [f"results/{run}/heads/{h}/{f}/{s}/seed{k}/metrics.json" for (h, f, s, k) in head_jobs(run)]
            t.append(f"results/{run}/summary.md")
    return t


# --- data.smk -------------------------------------------------------------------------------
def index_input(w):
    cfg = C(w)
    if cfg["data"].get("synthetic"):
        return f"results/{w.run}/synth.json"
    # a real dataset: its annotation file must exist (the index rule reports the rest)
    root = Path(cfg["data"]["root"])
    if cfg["data"]["format"] == "ave":
        return str(root / "Annotations.txt")
    return str(root / "annotations" / "unav100_annotations.json")



# --- decode.smk -----------------------------------------------------------------------------
def decoded_shards(w):
    return expand("results/{run}/decoded/shard-{shard}.zarr", run=w.run, shard=shards(w.run))


# --- extract.smk ----------------------------------------------------------------------------
def extract_weights(w):
    """`<enc>_ft`: the fine-tuned weights of `enc` (finetune/<enc>/weights.pth, or with side
    both finetune/<visual>+<audio>/<enc>.pth); base encoders: none (their weights are a param)."""
    if not w.enc.endswith("_ft"):
        return []
    base, ft = w.enc.removesuffix("_ft"), C(w)["finetune"]
    if base not in apcfg.trained_encoders(C(w)):  # validated configs never get here
        raise ValueError(f"{w.enc}: finetune.side = {ft['side']!r} does not train {base}")
    if ft["side"] == "both":
        return f"results/{w.run}/finetune/{ft['encoder']}+{ft['audio']}/{base}.pth"
    return f"results/{w.run}/finetune/{base}/weights.pth"


def extract_priority(w):
    """10 for the stores on the fine-tuning path (its frozen partner, the `_ft` re-extraction), else 0."""
    ft = C(w).get("finetune", {})
    if not ft.get("enabled"):
        return 0
    partner = {"visual": ft.get("audio"), "audio": ft.get("encoder")}.get(ft.get("side", "visual"))
    return 10 if w.enc.endswith("_ft") or w.enc == partner else 0


def enc_opt(key):
    return lambda w: apcfg.encoder_settings(C(w), w.enc).get(key, "")


def encoder_options(w):
    opts = apcfg.encoder_settings(C(w), w.enc)
    return kv_flags("--opt", {k: v for k, v in opts.items() if k in ("preprocessing", "pooled", "pca")})


def window_arg(w):
    win = C(w).get("windows")
    return f"--window {win['window']} --hop {win['hop']}" if win else ""


def encoder_shards(w, enc=None):
    """Every feature shard of encoder `enc` (default: the job's own) in the job's run."""
    return expand("results/{run}/features/{enc}/shard-{shard}.zarr", run=w.run, enc=enc or w.enc, shard=shards(w.run))


# --- finetune.smk ---------------------------------------------------------------------------
def ft_opt(key):
    return lambda w: C(w)["finetune"][key]


def ft_partner(w):
    """Rule `finetune`: the frozen partner's store (side visual: the audio encoder's, side
    audio: the visual encoder's); `{enc}` must be the encoder the side trains."""
    ft = C(w)["finetune"]
    if ft["side"] not in ("visual", "audio") or w.enc != ft[{"visual": "encoder", "audio": "audio"}[ft["side"]]]:
        raise ValueError(f"finetune/{w.enc}: finetune.side = {ft['side']!r} with encoder {ft.get('encoder')!r}, "
                         f"audio {ft.get('audio')!r} does not train {w.enc} alone")
    return encoder_shards(w, ft["audio"] if ft["side"] == "visual" else ft["encoder"])


# --- heads.smk ------------------------------------------------------------------------------
def feature_shards(w, which):
    return encoder_shards(w, w.features.split("+")[0 if which == "visual" else 1])


def head_opt(key, default=None):
    def get(w):
        return C(w)["heads"][w.head].get(key, default)

    return get


def kv_flags(flag, mapping):
    """`--flag key=value ...`, shell-quoted; lists / mappings as JSON (the CLI reads values as YAML)."""
    def text(v):
        return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)

    return " ".join(f"{flag} {shlex.quote(f'{k}={text(v)}')}" for k, v in sorted(mapping.items()))


def head_flag(key, flag):
    """`--flag value` when the head's config sets `key`, else nothing."""

    def get(w):
        v = C(w)["heads"][w.head].get(key)
        return f"{flag} {v}" if v not in (None, "") else ""

    return get


# --- report.smk -----------------------------------------------------------------------------
def head_metrics(w):
    return [f"results/{w.run}/heads/{h}/{f}/{s}/seed{k}/metrics.json" for (h, f, s, k) in head_jobs(w.run)]
