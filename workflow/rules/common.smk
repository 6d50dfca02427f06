# Shared set-up: configuration (validated before any job), runs, targets, fingerprints,
# the `avepipe` command the rules run, and the input/param functions of every rule file.
# Every value that reaches a shell command is quoted: option flags through
# avepipe.options.to_flags (shlex-quoted), paths and wildcards with Snakemake's `:q`.
import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate, min_version

min_version("9.0")

import avepipe.config as apcfg
from avepipe import options as O
from avepipe.provenance import code_fingerprint

REPO = Path(workflow.basedir)

# The demo is the default config. `--config key=value` merges on top of it (or on top of the
# `--configfile`, which replaces it), as Snakemake users expect.
if not workflow.overwrite_configfiles:

    configfile: str(REPO / "workflow" / "config" / "demo.yaml")


def _fail(exc):
    # one line per problem, no traceback (AVEPIPE_DEBUG=1 shows it)
    if os.environ.get("AVEPIPE_DEBUG") == "1":
        raise exc
    sys.stderr.write(f"avepipe: {exc}\n")
    sys.exit(1)


def _config_path(p):
    """`also:` entries: relative to the working directory, else to the checkout."""
    return p if Path(p).exists() or Path(p).is_absolute() else str(REPO / p)


try:
    apcfg.validate(config, "config")
    RUNS = {config["run"]: config}
    for _extra in config.get("also", []):
        _c = apcfg.load_config(_config_path(_extra))
        RUNS[_c["run"]] = _c
except apcfg.ConfigError as _e:
    _fail(_e)
# Snakemake's own validation of the same (generated) schema
validate(config, str(REPO / "avepipe" / "schemas" / "config.schema.yaml"))

# Preflight (avepipe/preflight.py): data root and videos, weights, profile placeholders,
# checked before the first job, in one summary; errors stop here. Not in cluster job steps.
if workflow.is_main_process and os.environ.get("AVEPIPE_PREFLIGHT", "1") != "0":
    from avepipe import preflight

    _dry = preflight.runs_no_jobs(sys.argv)
    _profile = preflight.profile_dir(sys.argv)
    _bad = []
    for _run, _cfg in RUNS.items():
        _found = preflight.run_checks(_cfg, profile=_profile, dry_run=_dry)
        print(preflight.report(_run, _found, verbose=False), file=sys.stderr)
        _bad += preflight.errors(_found)
    if _bad:
        _fail(f"preflight: {len(_bad)} problem(s) above; nothing was run (AVEPIPE_PREFLIGHT=0 skips the checks)")


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
    head=r"[a-z_0-9]+(@[A-Za-z0-9_.-]+)?",
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
    # so editing one stage's code reruns that stage and its descendants (docs/reference.md, Snakemake).
    return code_fingerprint(stage)


def flags(cls, section):
    """Quoted `--key=value` flags of the options in ``section`` (a validated config section)."""
    return O.to_flags(cls, section or {})


def head_runs(run):
    """(head[@variant], features, setting, seed) of every head job of ``run``."""
    cfg = RUNS[run]
    out = []
    for head, hc in cfg.get("heads", {}).items():
        names = [head] + [f"{head}@{v}" for v in hc.get("variants", {})]
        for name in names:
            for feats in hc.get("features") or cfg.get("features", []):
                for setting in hc.get("settings", ["full"]):
                    for seed in cfg["train"]["seeds"]:
                        out.append((name, feats, setting, seed))
    return out


def head_section(w):
    """`heads.<head>` with a variant's overrides applied (hparams merged)."""
    base, _, variant = w.head.partition("@")
    hc = dict(C(w)["heads"][base])
    if variant:
        over = hc["variants"][variant]
        hc.update({k: v for k, v in over.items() if k != "hparams"})
        hc["hparams"] = {**hc.get("hparams", {}), **over.get("hparams", {})}
    return hc


def all_targets():
    t = []
    for run, cfg in RUNS.items():
        t.append(f"results/{run}/decode_report.md")
        for enc in apcfg.feature_encoders(cfg):
            t.append(f"results/{run}/features/{enc}/summary.json")
        if cfg.get("heads"):
            # each head run is a result in its own right (deleting one reruns it), the summary over them
            t += [f"results/{run}/heads/{h}/{f}/{s}/seed{k}/metrics.json" for (h, f, s, k) in head_runs(run)]
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


def synth_section(w):
    syn = dict(C(w)["data"]["synthetic"])
    if syn.get("seed") is None:
        syn["seed"] = C(w)["seed"]
    return syn


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


def extract_flags(w):
    sec = apcfg.encoder_settings(C(w), w.enc)
    if w.enc.endswith("_ft"):
        sec["weights"] = extract_weights(w)
    own = apcfg.encoder_options(C(w), w.enc)
    opts = " ".join(f"--opt={shlex.quote(f'{k}={O._text(v)}')}" for k, v in sorted(own.items()))
    win = C(w).get("windows")
    wins = f"--window={win['window']} --hop={win['hop']}" if win else ""
    return " ".join(x for x in (flags(O.ExtractOptions, sec), opts, wins) if x)


def encoder_shards(w, enc=None):
    """Every feature shard of encoder `enc` (default: the job's own) in the job's run."""
    return expand("results/{run}/features/{enc}/shard-{shard}.zarr", run=w.run, enc=enc or w.enc, shard=shards(w.run))


# --- finetune.smk ---------------------------------------------------------------------------
def ft_partner(w):
    """Rule `finetune`: the frozen partner's store (side visual: the audio encoder's, side
    audio: the visual encoder's); `{enc}` must be the encoder the side trains."""
    ft = C(w)["finetune"]
    if ft["side"] not in ("visual", "audio") or w.enc != ft[{"visual": "encoder", "audio": "audio"}[ft["side"]]]:
        raise ValueError(f"finetune/{w.enc}: finetune.side = {ft['side']!r} with encoder {ft.get('encoder')!r}, "
                         f"audio {ft.get('audio')!r} does not train {w.enc} alone")
    return encoder_shards(w, ft["audio"] if ft["side"] == "visual" else ft["encoder"])


def finetune_flags(w):
    cfg = C(w)
    trained = apcfg.trained_encoders(cfg)
    weights = {e: apcfg.encoder_settings(cfg, e)["weights"] for e in trained}
    base = " ".join(f"--base-weights={shlex.quote(f'{e}={O._text(v)}')}" for e, v in weights.items()
                    if v is not None)  # none: the encoder's official weights
    # the trained encoders' own options, so fine-tuning sees inputs as their extraction does
    own = O._text({e: apcfg.encoder_options(cfg, e) for e in trained})
    return (f"{flags(O.FinetuneOptions, cfg['finetune'])} {base} --encoder-options={shlex.quote(own)}"
            f" --seed={cfg['seed']}")


# --- heads.smk ------------------------------------------------------------------------------
def feature_shards(w, which):
    return encoder_shards(w, w.features.split("+")[0 if which == "visual" else 1])


def train_flags(w):
    cfg = C(w)
    return " ".join((flags(O.TrainOptions, cfg["train"]), flags(O.HeadOptions, head_section(w)),
                     flags(O.EvaluateOptions, cfg.get("evaluate", {}))))


# --- summary.smk ----------------------------------------------------------------------------
def head_metrics(w):
    return [f"results/{w.run}/heads/{h}/{f}/{s}/seed{k}/metrics.json" for (h, f, s, k) in head_runs(w.run)]
