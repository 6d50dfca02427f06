"""Every stage's tunables, once: one dataclass per stage.

Each field says its name, type, default, limits and help. From these dataclasses come the
config schema sections (``avepipe.config.build_schema``), the subcommands' flags
(``add_arguments``), the flags the Snakemake rules pass (``to_flags``) and the objects the
stage functions take (``from_args``). Fields marked ``cli=False`` are workflow-level
(which jobs exist: shards, seeds, settings...) and never reach a command line.

This module imports nothing heavy: the Snakefile and ``avepipe --help`` read it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping


def option(default: Any = MISSING, *, help: str, choices: typing.Sequence | None = None,
           minimum: float | None = None, exclusive_minimum: float | None = None,
           maximum: float | None = None, pattern: str | None = None, cli: bool = True,
           config: bool = True, item_choices: typing.Sequence | None = None) -> Any:
    """A dataclass field with what the schema and the CLI need to know about it.

    ``cli=False``: workflow-level (planning) key, config only. ``config=False``: CLI only.
    Mutable defaults (lists, dicts) are copied per instance.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum,
            "exclusive_minimum": exclusive_minimum, "maximum": maximum, "pattern": pattern,
            "cli": cli, "config": config, "item_choices": tuple(item_choices) if item_choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- the stages
@dataclass
class SynthOptions:
    """`data.synthetic`: a synthetic dataset in the real layout (demo and tests)."""

    videos: int = option(help="number of videos", minimum=1)
    classes: int = option(4, help="number of event classes", minimum=1, maximum=100)
    seed: int | None = option(None, help="generator seed (default: the run's seed)", minimum=0)
    min_duration: float = option(20.0, help="UnAV-100 format: shortest video (s)", exclusive_minimum=0)
    max_duration: float = option(60.0, help="UnAV-100 format: longest video (s)", exclusive_minimum=0)
    split: list[float] = option([0.70, 0.15, 0.15], help="train / val / test shares of the videos "
                                "(class-stratified; each class keeps one train video)")


@dataclass
class IndexOptions:
    """`data`: where the dataset is and what to do with bad rows and files."""

    format: str = option(help="dataset layout", choices=("ave", "unav100"))
    root: str = option(help="dataset root, laid out as the real download")
    on_error: str = option("skip", help="skip (and report) bad rows and videos, or stop at the first",
                           choices=("skip", "fail"))
    max_missing: float = option(0.05, help="stop before any job when more than this share of the annotated "
                                "videos is missing from data.root", minimum=0, maximum=1)


@dataclass
class DecodeOptions:
    """`decode`: PyAV decoding of every video, one job per shard."""

    shards: int = option(16, help="decode/extract jobs per encoder (videos are hashed into shards)",
                         minimum=1, cli=False)
    n_segments: int | None = option(10, help="1-s segments per video (AVE 10); null = whole seconds of each "
                                    "video (UnAV-100)", minimum=1)
    sample_frames_per_segment: int = option(1, help="frames stored per second for fine-tuning (seeded "
                                            "random times, 224x224)", minimum=0)
    threads: int = option(1, help="decoder threads per job: that many videos decode at once, one FFmpeg thread "
                          "each", minimum=1)
    share_frames: str = option("base", choices=("none", "base", "all"), cli=False,
                               help="decode each video once per shard for a run's visual stores: base (two or more "
                                    "base visual stores share a frames job), all (the _ft stores too; their frames "
                                    "wait on disk through fine-tuning), none")


@dataclass
class ExtractOptions:
    """`encoders.<name>`: one encoder's feature extraction (the encoder's own options, such
    as `preprocessing`, are declared on its spec in avepipe/encoders/)."""

    weights: str | None = option(None, help="official name (see the encoder), random[:seed], or a path to "
                                 "a state dict in the official layout; default: the encoder's official weights")
    frames_per_segment: int = option(16, help="visual: frames per 1-s segment, averaged", minimum=1)
    batch_size: int = option(16, help="frames (visual) or 1-s chunks (audio) per forward pass", minimum=1)
    num_workers: int | None = option(None, help="decode worker processes; null: sized from the machine (CPU: 1, "
                                     "CUDA: cores - 1, at most 16)", minimum=0)
    threads: int = option(2, help="compute threads of each extraction job", minimum=1)
    dtype: str | None = option(None, help="stored dtype; default float16 for visual maps, float32 for "
                               "audio embeddings", choices=("float16", "float32"))
    device: str = option("auto", help="auto (CUDA when present) | cpu | cuda[:N]",
                         pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    resize_on: str = option("auto", help="where frames are resized: auto (the model's device on CUDA, the decode "
                            "workers on CPU), cpu, device", choices=("auto", "cpu", "device"))
    fuse: bool = option(True, help="inference-time fusions (ResNet-50: BatchNorm folded into its convolutions; "
                        "equal within float tolerance)")


@dataclass
class FinetuneOptions:
    """`finetune`: InfoNCE audio-visual fine-tuning (CACE-Net §3.4, eq. 9)."""

    enabled: bool = option(False, help="run the fine-tuning stage and its `<enc>_ft` re-extraction", cli=False)
    encoder: str | None = option(None, help="the visual encoder (trained with side visual / both)")
    audio: str | None = option(None, help="the audio encoder (trained with side audio / both)")
    side: str = option("visual", help="what trains: visual (audio partner read from its store, frozen), "
                       "audio (visual partner frozen) or both", choices=("visual", "audio", "both"))
    temperature: float = option(0.2, help="InfoNCE temperature", exclusive_minimum=0)
    epochs: int = option(50, help="epochs", minimum=1)
    lr: float = option(1e-3, help="SGD learning rate", exclusive_minimum=0)
    momentum: float = option(0.9, help="SGD momentum", minimum=0)
    weight_decay: float = option(1e-4, help="SGD weight decay", minimum=0)
    milestones: list[int] = option([15, 30], help="epochs (1-based) after which the lr is multiplied by 0.1")
    batch_size: int = option(128, help="videos per batch (InfoNCE negatives come from the batch)", minimum=2)
    proj_dim: int = option(128, help="projection dimension", minimum=1)
    trainable: str = option("all", help="all | last:<n> blocks of each trained encoder",
                            pattern=r"^(all|last:[1-9][0-9]*)$")
    include_val: bool = option(True, help="train on train + val videos (never test)")
    device: str = option("auto", help="auto (CUDA when present) | cpu | cuda[:N]",
                         pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")


# What the trainers accept, written once (they import these; the schema's choices come from them).
SELECT_ON = ("val", "test", "last")
PRECISIONS = ("float32", "bf16")


@dataclass
class TrainOptions:
    """`train`: how every head is trained and selected."""

    seeds: list[int] = option([0], help="one head run per seed (mean ± std in the summary)", cli=False)
    select_on: str = option("val", help="epoch selection split; test = the published protocol (optimistic, "
                            "labelled)", choices=SELECT_ON)
    normalize: str = option("none", help="z-score features with train-split statistics (demo: random weights)",
                            choices=("none", "standardize"))
    device: str = option("auto", help="auto (CUDA when present) | cpu | cuda[:N]",
                         pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    precision: str = option("float32", help="bf16: autocast (float32 weights, optimizer and losses); AVE heads",
                            choices=PRECISIONS)
    noisy: bool = option(True, help="weak setting: add the released background-only videos (imported by import-h5 "
                         "beside the stores, noisy/) to training when present, as AVE-ECCV18, CACE-Net and Ge et al. do")


@dataclass
class HeadOptions:
    """`heads.<name>`: one head's runs (the head's own hyper-parameters go under `hparams`)."""

    settings: list[str] = option(["full"], help="settings to train (each head says which it supports)",
                                 cli=False)
    features: list[str] | None = option(None, help="feature pairs this head trains on (default: all of "
                                        "`features`)", cli=False)
    epochs: int | None = option(None, help="epochs (default: the head's published recipe)", minimum=1)
    batch_size: int | None = option(None, help="batch size (default: the head's recipe)", minimum=1)
    lr: float | None = option(None, help="learning rate (default: the head's recipe)", exclusive_minimum=0)
    hparams: dict = option({}, help="the head's own hyper-parameters (constructor arguments)")


@dataclass
class EvaluateOptions:
    """`evaluate`: UnAV-100 detection post-processing and mAP thresholds."""

    tious: list[float] = option([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                                help="tIoU thresholds of mAP@tIoU")
    soft_nms_sigma: float = option(0.4, help="Gaussian soft-NMS sigma", exclusive_minimum=0)
    max_segments: int = option(100, help="segments kept per video", minimum=1)
    min_score: float = option(0.001, help="drop segments scoring below this", minimum=0)
    eval_every: int = option(5, help="dense head: evaluate (and select) every this many epochs", minimum=1)


# --------------------------------------------------------------------------- machinery
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple[Any, bool]:
    """(type without Optional, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _json_type(tp) -> dict:
    base, nullable = _unwrap(tp)
    origin = typing.get_origin(base)
    if base is bool:
        out: dict = {"type": "boolean"}
    elif base is int:
        out = {"type": "integer"}
    elif base is float:
        out = {"type": "number"}
    elif base is str:
        out = {"type": "string"}
    elif origin is list:
        out = {"type": "array", "items": _json_type(typing.get_args(base)[0])}
    elif base is dict or origin is dict:
        out = {"type": "object"}
    else:  # pragma: no cover - a new field type must be added here
        raise TypeError(f"option type {tp!r} is not supported")
    if nullable:
        out["type"] = [out["type"], "null"]
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def config_fields(cls) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata.get("config", True)]


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def json_schema(cls, *, defaults: Mapping[str, Any] | None = None) -> dict:
    """The config section of ``cls``: typed properties with limits, help and defaults;
    unknown keys are errors. ``defaults`` override field defaults (per encoder, say)."""
    hints, props, required = _hints(cls), {}, []
    for f in config_fields(cls):
        m = f.metadata
        p = _json_type(hints[f.name])
        p["description"] = m["help"]
        if m["choices"]:
            p["enum"] = list(m["choices"]) + ([None] if _unwrap(hints[f.name])[1] else [])
        if m["item_choices"]:
            p["items"]["enum"] = list(m["item_choices"])
        for key, val in (("minimum", m["minimum"]), ("exclusiveMinimum", m["exclusive_minimum"]),
                         ("maximum", m["maximum"]), ("pattern", m["pattern"])):
            if val is not None:
                p[key] = val
        d = (defaults or {}).get(f.name, _default(f))
        if d is MISSING:
            required.append(f.name)
        else:
            p["default"] = d
        props[f.name] = p
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(base, choices: typing.Sequence | None = None) -> typing.Callable[[str], Any]:
    def parse(text: str):
        if text == "null":  # an option whose default is null (None) can be set back to it
            return None
        value = text.lower() in ("1", "true", "yes", "on") if base is bool else base(text)
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, choices))}")
        return value

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls, *, required: typing.Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per CLI field of ``cls``; its help shows the default."""
    hints, required = _hints(cls), set(required)
    group = parser.add_argument_group(f"{cls.__name__} ({(cls.__doc__ or '').strip().splitlines()[0]})")
    for f in cli_fields(cls):
        base, _ = _unwrap(hints[f.name])
        m, d = f.metadata, (defaults or {}).get(f.name, _default(f))
        kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if d is MISSING or f.name in required:
            kw["required"] = True
        else:
            kw["default"] = d
            kw["help"] += f" (default: {json.dumps(d) if not isinstance(d, str) else d})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw.update(nargs="*", type=_scalar(typing.get_args(base)[0]), metavar="V")
        elif base is dict or typing.get_origin(base) is dict:
            kw.update(type=_json_object, metavar="JSON")
        else:
            kw["type"] = _scalar(base, m["choices"])
            if m["choices"]:
                kw["metavar"] = "{" + ",".join(map(str, m["choices"])) + "}"
        group.add_argument(_flag(f.name), **kw)


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return obj


def from_args(cls, ns: argparse.Namespace, **extra: Any):
    """An instance of ``cls`` from parsed flags (config-only fields keep their defaults)."""
    kw = {f.name: getattr(ns, f.name) for f in cli_fields(cls) if hasattr(ns, f.name)}
    kw.update(extra)
    return cls(**kw)


def from_config(cls, section: Mapping[str, Any] | None, **extra: Any):
    """An instance of ``cls`` from a (validated) config section."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in (section or {}).items() if k in names}
    kw.update(extra)
    return cls(**kw)


def _text(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def to_flags(cls, values: Mapping[str, Any]) -> str:
    """Shell-quoted flags for the CLI fields of ``cls`` present in ``values`` (a validated
    config section: defaults filled, so every value is explicit on the command line)."""
    hints, out = _hints(cls), []
    for f in cli_fields(cls):
        if f.name not in values:
            continue
        v, base = values[f.name], _unwrap(hints[f.name])[0]
        if base is bool:
            out.append(_flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        elif typing.get_origin(base) is list:
            out.append(" ".join([_flag(f.name), *(shlex.quote(_text(x)) for x in (v or []))]))
        else:
            out.append(f"{_flag(f.name)}={shlex.quote(_text(v))}")  # =: a value may start with "-"
    return " ".join(out)


def asdict(obj) -> dict:
    return dataclasses.asdict(obj)


__all__ = ["SynthOptions", "IndexOptions", "DecodeOptions", "ExtractOptions", "FinetuneOptions",
           "TrainOptions", "HeadOptions", "EvaluateOptions", "option", "json_schema", "add_arguments",
           "from_args", "from_config", "to_flags", "asdict", "config_fields", "cli_fields"]
