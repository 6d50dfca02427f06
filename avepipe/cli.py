"""The `avepipe` command: one subcommand per pipeline stage (the Snakemake rules call these).

Imports are lazy so `avepipe --help` and light stages start fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("avepipe")


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _kv(items: list[str] | None) -> dict:
    """Parse repeated ``key=value`` options; values as YAML scalars (numbers, booleans)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"expected key=value, got {item!r}")
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


# --------------------------------------------------------------------------- data
def cmd_validate_config(a) -> int:
    from avepipe.config import load_config

    for path in a.configs:
        cfg = load_config(path)
        print(f"{path}: ok (run {cfg['run']!r}, format {cfg['data']['format']!r})")
    return 0


def cmd_synth(a) -> int:
    from avepipe.datasets import synthetic

    kw = {"duration_range": tuple(a.durations)} if a.format == "unav100" else {}
    synthetic.make(a.format, a.out, a.videos, a.seed, classes=a.classes, progress=not a.no_progress, **kw)
    _write_json({"format": a.format, "root": str(a.out), "videos": a.videos, "seed": a.seed,
                 "classes": a.classes}, a.summary)
    return 0


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


def cmd_decode(a) -> int:
    import pandas as pd

    from avepipe.decode import decode_shard

    index = pd.read_parquet(a.index)
    rows = index[index["shard"] == int(a.shard)]
    status = decode_shard(rows, Path(a.out), n_segments=a.n_segments or None,
                          audio_rates=[int(r) for r in a.rates.split(",")],
                          sample_frames_per_segment=a.sample_frames, seed=a.seed,
                          on_error=a.on_error, progress=not a.no_progress)
    n_bad = int((status["status"] != "ok").sum())
    print(f"shard {a.shard}: {len(status)} videos, {n_bad} failed -> {a.out}")
    return 0


def cmd_decode_report(a) -> int:
    import pandas as pd

    from avepipe.decode import collect_manifest
    from avepipe.report import decode_report

    index = pd.read_parquet(a.index)
    manifest = collect_manifest(index, [Path(p) for p in a.shards])
    out = Path(a.out_dir)
    manifest.to_parquet(out / "manifest.parquet", index=False)
    problems = json.loads(Path(a.problems).read_text()) if a.problems else []
    decode_report(manifest, out, problems=problems)
    return 0


# --------------------------------------------------------------------------- features
def cmd_extract(a) -> int:
    import pandas as pd

    from avepipe.extract import extract_shard

    _threads(a.threads)
    index = pd.read_parquet(a.index)
    extract_shard(Path(a.decoded), index, a.encoder, a.weights, Path(a.out),
                  frames_per_segment=a.frames_per_segment, batch_size=a.batch_size,
                  num_workers=a.num_workers, device=a.device, dtype=a.dtype,
                  window=a.window, hop=a.hop, progress=not a.no_progress, **_kv(a.opt))
    return 0


def cmd_inspect(a) -> int:
    from avepipe.store import format_inspect, inspect_store

    infos = [inspect_store(p) for p in a.stores]
    if a.json or a.out:
        _write_json(infos[0] if len(infos) == 1 else {"shards": infos}, a.out)
    else:
        for info in infos:
            print(format_inspect(info))
    return 0


def cmd_export_h5(a) -> int:
    import pandas as pd

    from avepipe.interop import export_h5
    from avepipe.store import open_features

    manifest = pd.read_parquet(a.manifest)
    export_h5(manifest, open_features(a.visual), open_features(a.audio), Path(a.out_dir),
              dtype=a.dtype)
    return 0


def cmd_import_h5(a) -> int:
    import pandas as pd

    from avepipe.interop import import_h5

    index = pd.read_parquet(a.index)
    import_h5(Path(a.h5_dir), index, Path(a.out_dir))
    return 0


# --------------------------------------------------------------------------- training
def cmd_finetune(a) -> int:
    from avepipe.finetune import finetune_from_cli

    _threads(a.threads)
    return finetune_from_cli(a)


def cmd_train(a) -> int:
    _threads(a.threads)
    if a.format == "unav100":
        from avepipe.dense_train import train_dense_from_cli

        return train_dense_from_cli(a)
    from avepipe.train import train_from_cli

    return train_from_cli(a)


def cmd_summarize(a) -> int:
    from avepipe.summary import summarize

    summarize(a.run, [Path(p) for p in a.metrics], Path(a.out_dir))
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avepipe", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    s = add("validate-config", cmd_validate_config, "validate config files against the schema")
    s.add_argument("configs", nargs="+")

    s = add("synth", cmd_synth, "generate a synthetic dataset in the real AVE / UnAV-100 layout")
    s.add_argument("--format", choices=["ave", "unav100"], required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--videos", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--classes", type=int, default=4)
    s.add_argument("--durations", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                   help="UnAV-100 video durations in seconds")
    s.add_argument("--summary", help="write a JSON summary here")
    s.add_argument("--no-progress", action="store_true")

    s = add("dataset", cmd_dataset, "parse a dataset in the real layout and print statistics")
    s.add_argument("--format", choices=["ave", "unav100"], required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--json", action="store_true")

    s = add("index", cmd_index, "build the sample index (one row per sample, shard assigned)")
    s.add_argument("--format", choices=["ave", "unav100"], required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--shards", type=int, required=True)
    s.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    s.add_argument("--out", required=True)
    s.add_argument("--problems", required=True)

    s = add("decode", cmd_decode, "decode one shard of videos (audio per rate, frame sample)")
    s.add_argument("--index", required=True)
    s.add_argument("--shard", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n-segments", type=int, default=10, help="0 = whole seconds of each video")
    s.add_argument("--rates", default="16000,32000")
    s.add_argument("--sample-frames", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    s.add_argument("--no-progress", action="store_true")

    s = add("decode-report", cmd_decode_report, "merge decoded shards into the manifest and report")
    s.add_argument("--index", required=True)
    s.add_argument("--problems")
    s.add_argument("--out-dir", required=True)
    s.add_argument("shards", nargs="+")

    s = add("extract", cmd_extract, "extract one encoder's features for one decoded shard")
    s.add_argument("--decoded", required=True)
    s.add_argument("--index", required=True)
    s.add_argument("--encoder", required=True, choices=["vgg19", "resnet50", "vggish", "cnn14"])
    s.add_argument("--weights", default="random")
    s.add_argument("--frames-per-segment", type=int, default=16)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-workers", type=int, default=1)
    s.add_argument("--dtype", default="float16")
    s.add_argument("--device", default="auto")
    s.add_argument("--window", type=float)
    s.add_argument("--hop", type=float)
    s.add_argument("--opt", action="append", help="encoder option key=value (preprocessing, pooled, pca)")
    s.add_argument("--threads", type=int)
    s.add_argument("--out", required=True)
    s.add_argument("--no-progress", action="store_true")

    s = add("inspect", cmd_inspect, "print shape, dtype, chunks, provenance and failed videos of stores")
    s.add_argument("stores", nargs="+")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out")

    s = add("export-h5", cmd_export_h5, "write the legacy AVE h5 layout (CMBS/PSP/CACE-Net scripts)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--visual", nargs="+", required=True)
    s.add_argument("--audio", nargs="+", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])

    s = add("import-h5", cmd_import_h5, "turn the released AVE h5 features into avepipe stores")
    s.add_argument("--h5-dir", required=True)
    s.add_argument("--index", required=True)
    s.add_argument("--out-dir", required=True)

    s = add("finetune", cmd_finetune, "InfoNCE audio-visual fine-tuning of an encoder (or of both)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--encoder", required=True, help="the trained encoder (side both: the visual one)")
    s.add_argument("--base-weights", default="random")
    s.add_argument("--side", choices=["visual", "audio", "both"], default="visual")
    s.add_argument("--audio-encoder", help="side both: the audio encoder trained with --encoder")
    s.add_argument("--audio-base-weights", default="random", help="side both: its base weights")
    s.add_argument("--temperature", type=float, default=0.2)
    s.add_argument("--epochs", type=int, default=50)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--momentum", type=float, default=0.9)
    s.add_argument("--weight-decay", type=float, default=1e-4)
    s.add_argument("--milestones", default="15,30")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--proj-dim", type=int, default=128)
    s.add_argument("--trainable", default="all")
    s.add_argument("--include-val", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--partner-store", "--audio-store", dest="partner_store", nargs="+", default=[],
                   help="the frozen partner's feature shards (side visual: audio store; audio: visual store)")
    s.add_argument("--decoded", nargs="+", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--no-progress", action="store_true")

    s = add("train", cmd_train, "train and evaluate one localization head")
    s.add_argument("--format", choices=["ave", "unav100"], default="ave")
    s.add_argument("--manifest", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--setting", default="full", choices=["full", "weak", "cml"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--hparam", action="append", help="head hyperparameter key=value")
    s.add_argument("--eval", action="append", help="evaluation setting key=value")
    s.add_argument("--select-on", choices=["val", "test"], default="val")
    s.add_argument("--normalize", choices=["none", "standardize"], default="none",
                   help="z-score features with train-split statistics (demo: random weights)")
    s.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                   help="bf16: autocast, ~2x faster on CPUs with AMX/AVX512-BF16 and on GPUs")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int)
    s.add_argument("--visual", nargs="+", required=True)
    s.add_argument("--audio-features", nargs="+", required=True)
    s.add_argument("--features-name", default="")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--no-progress", action="store_true")

    s = add("summarize", cmd_summarize, "aggregate head metrics into summary.json / summary.md / plots")
    s.add_argument("--run", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("metrics", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    # Large tensors on transparent huge pages (read by torch's CPU allocator at its first
    # allocation, so before torch is imported): a fresh 64 MB activation then faults in 32
    # pages instead of 16,384; elementwise passes over the heads' maps run ~1.5-2x faster.
    # THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from avepipe.config import ConfigError

    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"avepipe: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
