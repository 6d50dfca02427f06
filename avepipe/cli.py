"""The `avepipe` command: one subcommand per pipeline stage (the Snakemake rules call these).

Each stage's options come from its dataclass in avepipe/options.py (flags, defaults, help);
stage modules are imported only by the command that runs, so `avepipe --help` and the light
stages start fast. Errors a user can fix (config, dataset, weights, damaged stores, missing
files) print one line naming what is wrong; `AVEPIPE_DEBUG=1` shows the traceback.

Why one long module: the table of subcommands, one short function pair per stage;
splitting it would scatter what `avepipe --help` shows in one place.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from avepipe import options as O

log = logging.getLogger("avepipe")

# Exceptions that describe a problem with the user's input rather than a bug: one line, exit 2.
USER_ERRORS = {"ConfigError", "DatasetError", "WeightsError", "DataMismatchError", "StoreDamagedError",
               "MediaError", "PreflightError", "TestSplitError", "H5ImportError", "EncoderOptionError",
               "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "PermissionError"}


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _kv(items: list[str] | None, what: str) -> dict:
    """Parse repeated ``key=value`` options; values as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"avepipe: {what}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _write_json(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    else:
        print(text)


def _config_of(a) -> dict:
    """What a stage records as its configuration: its flags (not the function to run)."""
    return {k: v for k, v in vars(a).items() if k not in ("fn", "command", "verbose")}


# =========================================================================== commands
# --------------------------------------------------------------------------- config
def args_validate_config(s):
    s.add_argument("configs", nargs="+", help="config files (YAML)")


def cmd_validate_config(a) -> int:
    from avepipe.config import load_config

    for path in a.configs:
        cfg = load_config(path)
        print(f"{path}: ok (run {cfg['run']!r}, format {cfg['data']['format']!r})")
    return 0


def args_check(s):
    s.add_argument("configs", nargs="+", help="config files (YAML)")
    s.add_argument("--profile", help="a Snakemake profile folder to check for placeholders (e.g. "
                                     "workflow/profiles/slurm)")


def cmd_check(a) -> int:
    from avepipe import preflight
    from avepipe.config import load_config

    bad = 0
    for path in a.configs:
        cfg = load_config(path)
        runs = [cfg] + [load_config(p) for p in cfg.get("also", [])]
        for c in runs:
            found = preflight.run_checks(c, profile=Path(a.profile) if a.profile else None)
            print(preflight.report(c["run"], found))
            bad += len(preflight.errors(found))
    return 1 if bad else 0


def args_status(s):
    s.add_argument("runs", nargs="*", help="runs to show: names or results/<run> folders (default: every run "
                                           "of the config)")
    s.add_argument("--configfile", help="the run's config, as given to snakemake (default: the demo, or the "
                                        "shipped config of that run name)")
    s.add_argument("--cores", type=int, help="cores the rest of the run will have, for the ETA "
                                             "(default: this machine's)")
    s.add_argument("--json", action="store_true", help="print JSON")


def cmd_status(a) -> int:
    import yaml

    from avepipe.status import REPO, format_status, status

    runs = [Path(r).name for r in a.runs]
    config = a.configfile
    if config is None and runs:  # a shipped config whose run is the one asked for
        for p in sorted((REPO / "workflow" / "config").glob("*.yaml")):
            if (yaml.safe_load(p.read_text()) or {}).get("run") in runs and p.name not in ("demo.yaml",
                                                                                          "demo_unav.yaml"):
                config = str(p)
    st = status(config, runs or None, cores=a.cores)
    if a.json:
        _write_json(st, None)
    else:
        print(format_status(st, a.cores or os.cpu_count() or 1))
    return 0


def args_schema(s):
    s.add_argument("--write", action="store_true", help="rewrite avepipe/schemas/config.schema.yaml")
    s.add_argument("--check", action="store_true", help="exit 1 if the schema file is out of date")


def cmd_schema(a) -> int:
    from avepipe.config import SCHEMA_PATH, schema_text

    text = schema_text()
    if a.write:
        SCHEMA_PATH.write_text(text)
        print(f"wrote {SCHEMA_PATH}")
    elif a.check:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is out of date: run `avepipe schema --write`", file=sys.stderr)
            return 1
        print(f"{SCHEMA_PATH}: up to date")
    else:
        print(text, end="")
    return 0


# --------------------------------------------------------------------------- data
def args_synth(s):
    s.add_argument("--format", choices=["ave", "unav100"], required=True, help="dataset layout to write")
    s.add_argument("--out", type=Path, required=True, help="dataset root to create")
    O.add_arguments(s, O.SynthOptions)
    s.add_argument("--summary", help="write a JSON summary here")


def cmd_synth(a) -> int:
    from avepipe.datasets import synthetic

    opts = O.from_args(O.SynthOptions, a)
    kw = {"duration_range": (opts.min_duration, opts.max_duration)} if a.format == "unav100" else {}
    seed = opts.seed or 0
    synthetic.make(a.format, a.out, opts.videos, seed, classes=opts.classes,
                   split_fractions=tuple(opts.split), **kw)
    _write_json({"format": a.format, "root": str(a.out), "videos": opts.videos, "seed": seed,
                 "classes": opts.classes, "split": list(opts.split)}, a.summary)
    return 0


def args_dataset(s):
    s.add_argument("--format", choices=["ave", "unav100"], required=True, help="dataset layout")
    s.add_argument("--root", required=True, help="dataset root, laid out as the real download")
    s.add_argument("--json", action="store_true", help="print JSON")


def cmd_dataset(a) -> int:
    from avepipe.datasets.index import build_index, dataset_stats

    df, problems = build_index(a.format, a.root, n_shards=1, on_error="skip")
    stats = dataset_stats(df, problems)
    if a.json:
        _write_json(stats, None)
    else:
        for k, v in stats.items():
            print(f"{k}: {v}")
    return 0


def args_index(s):
    O.add_arguments(s, O.IndexOptions)
    s.add_argument("--shards", type=int, required=True, help="number of shards (decode.shards)")
    s.add_argument("--out", required=True, help="index.parquet to write")
    s.add_argument("--problems", required=True, help="index_problems.json to write")


def cmd_index(a) -> int:
    from avepipe.datasets.ave import problems_to_json
    from avepipe.datasets.index import build_index

    df, problems = build_index(a.format, a.root, n_shards=a.shards, on_error=a.on_error)
    for p in problems:
        log.warning("%s", p)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(a.out, index=False)
    Path(a.problems).write_text(problems_to_json(problems))
    print(f"{len(df)} samples, {df.video_id.nunique()} videos, {len(problems)} problems -> {a.out}")
    return 0


def args_decode(s):
    s.add_argument("--index", required=True, help="index.parquet")
    s.add_argument("--shard", required=True, help="shard number")
    s.add_argument("--out", required=True, help="decoded shard store to write")
    O.add_arguments(s, O.DecodeOptions)
    s.add_argument("--rates", type=int, nargs="+", default=[16000], help="audio sample rates to store")
    s.add_argument("--seed", type=int, default=0, help="seed of the frame sample times")
    s.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="mark a bad video failed and go on, or stop")


def cmd_decode(a) -> int:
    import pandas as pd

    from avepipe.decode import decode_shard

    opts = O.from_args(O.DecodeOptions, a)
    index = pd.read_parquet(a.index)
    rows = index[index["shard"] == int(a.shard)]
    status = decode_shard(rows, Path(a.out), n_segments=opts.n_segments, audio_rates=a.rates,
                          sample_frames_per_segment=opts.sample_frames_per_segment, seed=a.seed,
                          on_error=a.on_error, threads=opts.threads)
    n_bad = int((status["status"] != "ok").sum())
    print(f"shard {a.shard}: {len(status)} videos, {n_bad} failed -> {a.out}")
    return 0


def args_decode_report(s):
    s.add_argument("--index", required=True, help="index.parquet")
    s.add_argument("--problems", help="index_problems.json")
    s.add_argument("--out-dir", required=True, help="run folder (manifest and report go here)")
    s.add_argument("shards", nargs="+", help="decoded shard stores")


def cmd_decode_report(a) -> int:
    import pandas as pd

    from avepipe.decode import collect_manifest
    from avepipe.decode_report import decode_report

    index = pd.read_parquet(a.index)
    manifest = collect_manifest(index, [Path(p) for p in a.shards])
    out = Path(a.out_dir)
    manifest.to_parquet(out / "manifest.parquet", index=False)
    problems = json.loads(Path(a.problems).read_text()) if a.problems else []
    decode_report(manifest, out, problems=problems)
    return 0


# --------------------------------------------------------------------------- features
def args_extract(s):
    s.add_argument("--decoded", required=True, help="decoded shard store")
    s.add_argument("--index", required=True, help="index.parquet (video paths)")
    s.add_argument("--encoder", required=True, help="encoder name (vgg19, resnet50, vggish, cnn14, ...)")
    O.add_arguments(s, O.ExtractOptions)
    s.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="the encoder's own option (e.g. preprocessing=ave, pooled=true); repeatable")
    s.add_argument("--window", type=float, help="UnAV-100: feature window (s)")
    s.add_argument("--hop", type=float, help="UnAV-100: window hop (s)")
    s.add_argument("--frames", help="the shard's frames store (shared decoding; videos it lacks are decoded here)")
    s.add_argument("--stats", help="write the data-path timings (JSON) here")
    s.add_argument("--out", required=True, help="feature shard store to write")


def cmd_extract(a) -> int:
    import pandas as pd

    from avepipe.extract import extract_shard

    opts = O.from_args(O.ExtractOptions, a)
    _threads(opts.threads)
    index = pd.read_parquet(a.index)
    extract_shard(Path(a.decoded), index, a.encoder, opts.weights, Path(a.out),
                  frames_per_segment=opts.frames_per_segment, batch_size=opts.batch_size,
                  num_workers=opts.num_workers, device=opts.device, dtype=opts.dtype,
                  window=a.window, hop=a.hop, config=_config_of(a), frames=a.frames, stats=a.stats,
                  resize_on=opts.resize_on, fuse=opts.fuse, **_kv(a.opt, "--opt"))
    return 0


def args_frames(s):
    s.add_argument("--decoded", help="decoded shard store (video ids, n_segments, status)")
    s.add_argument("--index", help="index.parquet (video paths)")
    s.add_argument("--readers", nargs="+", metavar="JSON",
                   help="one file per visual store that reads this frames store (frames/readers/<enc>.json)")
    s.add_argument("--workers", type=int, help="decoding processes (default: the cores this process may use)")
    s.add_argument("--out", help="frames store to write")
    s.add_argument("--empty", metavar="STORE",
                   help="instead: remove the frame data of STORE (every reader has finished), keep the folder")


def cmd_frames(a) -> int:
    from avepipe import frames

    if a.empty:
        frames.empty_frames_store(a.empty)
        print(f"emptied {a.empty}")
        return 0
    missing = [f"--{k}" for k in ("decoded", "index", "readers", "out") if not getattr(a, k)]
    if missing:
        raise SystemExit(f"avepipe frames: {', '.join(missing)} required (or --empty STORE)")
    frames.run(a.decoded, a.index, a.readers, a.out, workers=a.workers)
    return 0


def args_inspect(s):
    s.add_argument("stores", nargs="+", help="feature shard stores or folders of them")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--out", help="write the JSON here")


def cmd_inspect(a) -> int:
    from avepipe.store import format_inspect, inspect_store

    infos = [inspect_store(p) for p in a.stores]
    if a.json or a.out:
        _write_json(infos[0] if len(infos) == 1 else {"shards": infos}, a.out)
    else:
        for info in infos:
            print(format_inspect(info))
    return 0


def args_verify(s):
    s.add_argument("stores", nargs="+", help="feature or decoded stores, or folders of feature shards")
    s.add_argument("--json", action="store_true", help="print the problems as JSON")


def cmd_verify(a) -> int:
    from avepipe.verify import run

    return run(a.stores, as_json=a.json)


def args_export_h5(s):
    s.add_argument("--manifest", required=True, help="manifest.parquet")
    s.add_argument("--visual", nargs="+", required=True, help="visual feature shards")
    s.add_argument("--audio", nargs="+", required=True, help="audio feature shards")
    s.add_argument("--out-dir", required=True, help="folder for the h5 files")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="h5 dtype (default: float32)")


def cmd_export_h5(a) -> int:
    import pandas as pd

    from avepipe.interop import export_h5
    from avepipe.store import open_features

    manifest = pd.read_parquet(a.manifest)
    export_h5(manifest, open_features(a.visual), open_features(a.audio), Path(a.out_dir), dtype=a.dtype)
    return 0


def args_import_h5(s):
    s.add_argument("--h5-dir", required=True, help="folder of the released AVE h5 files")
    s.add_argument("--index", required=True, help="index.parquet of the AVE annotations")
    s.add_argument("--out-dir", required=True, help="folder for the stores")
    s.add_argument("--noisy", choices=["auto", "yes", "no"], default="auto",
                   help="the weak setting's background-only videos (*_noisy.h5): auto = import when all three files "
                        "are there, yes = they must be, no = skip them")


def cmd_import_h5(a) -> int:
    import pandas as pd

    from avepipe.interop import import_h5

    import_h5(Path(a.h5_dir), pd.read_parquet(a.index), Path(a.out_dir),
              noisy={"auto": None, "yes": True, "no": False}[a.noisy])
    return 0


# --------------------------------------------------------------------------- training
def args_finetune(s):
    s.add_argument("--manifest", required=True, help="manifest.parquet")
    s.add_argument("--decoded", nargs="+", required=True, help="decoded shard stores (frames, waveforms)")
    s.add_argument("--partner-store", nargs="*", default=[],
                   help="the frozen partner's feature shards (side visual: the audio store; audio: the visual store)")
    s.add_argument("--base-weights", action="append", metavar="ENCODER=WEIGHTS",
                   help="starting weights of each trained encoder (default: its official weights); repeatable")
    s.add_argument("--encoder-options", type=O._json_object, default={}, metavar="JSON",
                   help='each trained encoder\'s own options, as its extraction uses them, e.g. '
                        '\'{"vggish": {"framing": "clip"}}\'')
    O.add_arguments(s, O.FinetuneOptions)
    s.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffles and frame picks")
    s.add_argument("--threads", type=int, help="torch threads")
    s.add_argument("--out-dir", required=True, help="output folder")


def cmd_finetune(a) -> int:
    from avepipe.training import finetune

    _threads(a.threads)
    opts = O.from_args(O.FinetuneOptions, a)
    finetune.run(a.manifest, a.decoded, a.partner_store, a.out_dir, opts,
                 base_weights={k: str(v) for k, v in _kv(a.base_weights, "--base-weights").items()},
                 seed=a.seed, encoder_options=a.encoder_options, config=_config_of(a))
    return 0


def args_train(s):
    s.add_argument("--manifest", required=True, help="manifest.parquet")
    s.add_argument("--head", required=True, help="head name (cace_net, ccln, event_memory, avel, ..., dense)")
    s.add_argument("--setting", default="full", choices=["full", "weak", "cml"], help="supervision setting")
    s.add_argument("--seed", type=int, default=0, help="training seed")
    s.add_argument("--visual", nargs="+", required=True, help="visual feature shards")
    s.add_argument("--audio", nargs="+", required=True, help="audio feature shards")
    s.add_argument("--features-name", default="", help="the feature pair's name, for provenance")
    O.add_arguments(s, O.TrainOptions)
    O.add_arguments(s, O.HeadOptions)
    O.add_arguments(s, O.EvaluateOptions)
    s.add_argument("--threads", type=int, help="torch threads")
    s.add_argument("--out-dir", required=True, help="output folder")


def cmd_train(a) -> int:
    import importlib

    from avepipe import heads

    head = a.head.partition("@")[0]  # "<head>@<variant>": a variant's folder name
    entry = heads.entry(head)
    if a.setting not in heads.settings(head):
        from avepipe.config import ConfigError

        raise ConfigError(f"head {head!r} supports settings {list(heads.settings(head))}, not {a.setting!r}")
    _threads(a.threads)
    trainer = importlib.import_module(f"avepipe.training.{entry.trainer}")
    trainer.run(a.manifest, a.visual, a.audio, a.out_dir, head=head, setting=a.setting, seed=a.seed,
                train=O.from_args(O.TrainOptions, a), head_opts=O.from_args(O.HeadOptions, a),
                evaluate=O.from_args(O.EvaluateOptions, a), features_name=a.features_name,
                config=_config_of(a))
    return 0


def args_summarize(s):
    s.add_argument("--run", required=True, help="run name")
    s.add_argument("--out-dir", required=True, help="run folder")
    s.add_argument("metrics", nargs="*", help="metrics.json of every head run")


def cmd_summarize(a) -> int:
    from avepipe.summary import summarize

    summarize(a.run, [Path(p) for p in a.metrics], Path(a.out_dir))
    return 0


# =========================================================================== parser
COMMANDS = {
    # name: (help, add-arguments, run)
    "validate-config": ("validate config files against the schema", args_validate_config, cmd_validate_config),
    "check": ("preflight: validate configs, check data root and videos, weights and profile placeholders",
              args_check, cmd_check),
    "schema": ("print (or --write / --check) the config schema generated from the registries",
               args_schema, cmd_schema),
    "synth": ("generate a synthetic dataset in the real AVE / UnAV-100 layout", args_synth, cmd_synth),
    "dataset": ("parse a dataset in the real layout and print statistics", args_dataset, cmd_dataset),
    "index": ("build the sample index (one row per sample, shard assigned)", args_index, cmd_index),
    "decode": ("decode one shard of videos (audio per rate, frame sample)", args_decode, cmd_decode),
    "decode-report": ("merge decoded shards into the manifest and report", args_decode_report, cmd_decode_report),
    "frames": ("decode a shard once for several visual encoders (frames store), or empty one",
               args_frames, cmd_frames),
    "extract": ("extract one encoder's features for one decoded shard", args_extract, cmd_extract),
    "inspect": ("print shape, dtype, chunks, provenance and failed videos of stores", args_inspect, cmd_inspect),
    "verify": ("read every chunk of stores; exit 1 naming each damaged store, array and chunk",
               args_verify, cmd_verify),
    "export-h5": ("write the legacy AVE h5 layout (CMBS/PSP/CACE-Net scripts)", args_export_h5, cmd_export_h5),
    "import-h5": ("turn the released AVE h5 features into avepipe stores", args_import_h5, cmd_import_h5),
    "finetune": ("InfoNCE audio-visual fine-tuning of an encoder (or of both)", args_finetune, cmd_finetune),
    "train": ("train and evaluate one localization head", args_train, cmd_train),
    "status": ("where a run stands: done/total per stage, failures, ETA from finished jobs' benchmarks",
               args_status, cmd_status),
    "summarize": ("aggregate head metrics into summary.json / summary.md / plots", args_summarize, cmd_summarize),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand gets its arguments (fast start)."""
    p = argparse.ArgumentParser(prog="avepipe", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, fn) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if only in (None, name):
            add(sp)
            for action in sp._actions:  # every default shown in --help
                if (action.help and action.option_strings and not action.required
                        and action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help):
                    action.help += " (default: %(default)s)"
    return p


def _is_user_error(exc: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS for c in type(exc).__mro__)


def main(argv: list[str] | None = None) -> int:
    # Large tensors on transparent huge pages (read by torch's CPU allocator at its first
    # allocation, so before torch is imported): fresh activations then fault in 2 MB pages,
    # which makes elementwise passes over the heads' maps much cheaper.
    # THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((x for x in argv if x in COMMANDS), None)
    args = build_parser(only).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args) or 0)
    except Exception as exc:  # noqa: BLE001 - user errors get one line, bugs a traceback
        if os.environ.get("AVEPIPE_DEBUG") == "1" or not _is_user_error(exc):
            raise
        msg = str(exc).strip() or type(exc).__name__
        print(f"avepipe {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
