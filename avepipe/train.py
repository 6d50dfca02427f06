"""The one training loop for every AVEL head (contracts.md "Heads").

``load_ave_data`` turns the sample manifest plus a visual and an audio feature store into
tensors per split; ``train_head`` trains a registered head in one setting (full / weak /
cml), selects an epoch (on val by default), and writes under ``out_dir``:

- ``checkpoint.pt``  model, optimizer, schedule, epoch, RNG states, best so far (every epoch)
- ``log.jsonl``      one JSON line per epoch (losses, val/test scores, lr, timings)
- ``best.pt``        weights of the selected epoch
- ``metrics.json``   test metrics of the selected epoch, protocol and provenance
- ``learning_curve.png``

Design notes: the features stay in memory as tensors (float16 stays float16 and is cast
per batch) and batches are gathered by index, so there is no per-sample Python work;
shuffling uses a seeded ``torch.Generator`` whose state is checkpointed with all other
RNG states, so a run killed after any epoch resumes to bit-identical weights on CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from avepipe import metrics as M
from avepipe.datasets.labels import BACKGROUND, NUM_CLASSES, ave_label_arrays
from avepipe.devices import resolve_device
from avepipe.heads import HEADS, build, train_defaults

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SELECT_ON = ("val", "test", "last")


# --------------------------------------------------------------------------- data
@dataclass
class SplitData:
    """One split's tensors; rows are samples (manifest rows), in manifest order."""

    visual: torch.Tensor            # (N,T,...) float16/float32
    audio: torch.Tensor             # (N,T,Ca)
    segment_labels: torch.Tensor    # (N,T,29) one-hot, background = 28
    event_mask: torch.Tensor        # (N,T)
    video_label: torch.Tensor       # (N,29), background column 0
    video_ids: list[str]
    samples: np.ndarray             # manifest `sample` (or row position)

    def __len__(self) -> int:
        return int(self.visual.shape[0])

    def to(self, device) -> "SplitData":
        return SplitData(*(t.to(device) for t in (self.visual, self.audio, self.segment_labels,
                                                  self.event_mask, self.video_label)),
                         self.video_ids, self.samples)

    def batch(self, idx: torch.Tensor, device, dtype=torch.float32) -> dict:
        """Gather rows ``idx`` (one indexing op per tensor) and cast on the target device."""
        def take(t):
            return t[idx].to(device, non_blocking=True).to(dtype)
        return {"visual": take(self.visual), "audio": take(self.audio),
                "segment_labels": take(self.segment_labels), "event_mask": take(self.event_mask),
                "video_label": take(self.video_label)}


@dataclass
class AVEData:
    splits: dict[str, SplitData]
    visual_shape: tuple            # per segment: (H,W,C) or (C,)
    audio_dim: int
    n_segments: int
    n_failed_excluded: int = 0
    failed: list[dict] = field(default_factory=list)   # [{sample, video_id, split, reason}]
    n_short: int = 0               # kept samples with fewer real steps than n_segments
    provenance: dict = field(default_factory=dict)      # {"visual": ..., "audio": ...}

    def summary(self) -> dict:
        return {"n_" + k: len(v) for k, v in self.splits.items()} | {
            "n_failed_excluded": self.n_failed_excluded, "n_short": self.n_short,
            "visual_shape": list(self.visual_shape), "audio_dim": self.audio_dim,
            "n_segments": self.n_segments}


class DataMismatchError(ValueError):
    """Manifest and feature stores do not describe the same samples."""


def _unpack(fs, name: str, n_rows: int):
    """(features, video_ids|None, status|None, lengths|None, attrs) from a FeatureSet or array."""
    if hasattr(fs, "features"):
        feats = fs.features
        ids = None if getattr(fs, "video_ids", None) is None else np.asarray(fs.video_ids).astype(str)
        status = None if getattr(fs, "status", None) is None else np.asarray(fs.status).astype(str)
        reason = getattr(fs, "reason", None)
        lengths = None if getattr(fs, "lengths", None) is None else np.asarray(fs.lengths)
        attrs = dict(getattr(fs, "attrs", {}) or {})
    else:
        feats, ids, status, reason, lengths, attrs = fs, None, None, None, None, {}
    if len(feats.shape) < 3:
        raise DataMismatchError(f"{name} features must be (N,T,...), got shape {tuple(feats.shape)}")
    if feats.shape[0] != n_rows:
        raise DataMismatchError(f"{name} features have {feats.shape[0]} rows but the manifest has "
                                f"{n_rows}; open them with open_features(path, video_ids=manifest.video_id)")
    reason = None if reason is None else np.asarray(reason).astype(str)
    return feats, ids, status, reason, lengths, attrs


def _materialise(feats, rows: np.ndarray, dtype) -> torch.Tensor:
    """Rows of a numpy/dask/torch array as a tensor; float64 -> float32, float16 kept."""
    if isinstance(feats, torch.Tensor):
        t = feats[torch.as_tensor(rows)]
    else:
        sub = feats[rows] if len(rows) else feats[:0]
        if hasattr(sub, "compute"):
            sub = sub.compute()
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(sub)))
    if dtype is not None:
        return t.to(dtype)
    return t.float() if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) else t


def load_ave_data(manifest: pd.DataFrame, visual, audio, *, split_column: str = "split",
                  n_segments: int = 10, dtype: torch.dtype | None = None) -> AVEData:
    """Tensors per split from the sample manifest and two feature stores.

    ``visual``/``audio``: ``FeatureSet`` (``avepipe.store.open_features(path,
    video_ids=manifest.video_id)``), a path to open that way, or plain (N,T,...) arrays
    whose rows are the manifest's rows. A sample is excluded (and counted) when the
    manifest says its file is missing or decoding failed, or either store's status is not
    ``ok``. Mismatched ids, T or shapes raise ``DataMismatchError`` before any training.
    ``split_column`` picks another split (e.g. the CML "match" split) when present.
    ``dtype``: storage dtype in memory (default: keep float16/float32, float64 -> float32).
    """
    man = manifest.reset_index(drop=True)
    for col in ("video_id", split_column, "label", "start", "end"):
        if col not in man.columns:
            raise DataMismatchError(f"manifest lacks column {col!r}")
    ids = man["video_id"].astype(str).to_numpy()
    opened = []
    for name, fs in (("visual", visual), ("audio", audio)):
        if isinstance(fs, (str, os.PathLike)):
            from avepipe.store import open_features
            fs = open_features(fs, video_ids=list(ids))
        opened.append(_unpack(fs, name, len(man)))
    (vf, vids, vstat, vreason, vlen, vattrs), (af, aids, astat, areason, alen, aattrs) = opened
    for name, fids in (("visual", vids), ("audio", aids)):
        if fids is not None and not np.array_equal(fids, ids):
            bad = np.flatnonzero(fids != ids)
            ex = ", ".join(f"row {i}: manifest {ids[i]!r} vs {fids[i]!r}" for i in bad[:3])
            raise DataMismatchError(f"{name} store video ids differ from the manifest at {len(bad)} "
                                    f"row(s) ({ex}); open it with video_ids=manifest.video_id")
    if vf.shape[1] != n_segments or af.shape[1] != n_segments:
        raise DataMismatchError(f"feature steps differ: visual T={vf.shape[1]}, audio T={af.shape[1]}, "
                                f"labels T={n_segments}")
    if len(vf.shape) not in (3, 5):
        raise DataMismatchError(f"visual features must be (N,T,C) or (N,T,H,W,C), got {tuple(vf.shape)}")
    if len(af.shape) != 3:
        raise DataMismatchError(f"audio features must be (N,T,C), got {tuple(af.shape)}")
    splits = man[split_column].astype(str).to_numpy()
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DataMismatchError(f"manifest column {split_column!r} has unknown splits {unknown}")

    # why a sample is excluded ('' = kept)
    reason = np.full(len(man), "", dtype=object)

    def flag(mask, why):
        mask = np.asarray(mask, bool)
        reason[mask & (reason == "")] = why[mask] if isinstance(why, np.ndarray) else why

    if "exists" in man.columns:
        flag(~man["exists"].astype(bool).to_numpy(), "video file missing")
    for col in ("status", "decode_status"):
        if col in man.columns:
            st = man[col].astype(str).to_numpy()
            flag(st != "ok", np.array([f"decode {s}" for s in st], dtype=object))
    for name, st, rs in (("visual", vstat, vreason), ("audio", astat, areason)):
        if st is not None:
            why = np.array([f"{name} features {s}" + (f": {r}" if rs is not None and r else "")
                            for s, r in zip(st, rs if rs is not None else [""] * len(st))], dtype=object)
            flag(st != "ok", why)
    short = np.zeros(len(man), bool)
    for ln in (vlen, alen):
        if ln is not None:
            short |= np.asarray(ln) < n_segments
    kept = reason == ""

    seg, mask, video = ave_label_arrays(man, n_segments)
    sample = man["sample"].to_numpy() if "sample" in man.columns else np.arange(len(man))
    out: dict[str, SplitData] = {}
    for s in SPLITS:
        rows = np.flatnonzero((splits == s) & kept)
        out[s] = SplitData(
            visual=_materialise(vf, rows, dtype), audio=_materialise(af, rows, dtype),
            segment_labels=torch.from_numpy(seg[rows]), event_mask=torch.from_numpy(mask[rows]),
            video_label=torch.from_numpy(video[rows]), video_ids=list(ids[rows]), samples=sample[rows])
    failed = [{"sample": int(sample[i]), "video_id": str(ids[i]), "split": str(splits[i]),
               "reason": str(reason[i])} for i in np.flatnonzero(~kept)]
    return AVEData(splits=out, visual_shape=tuple(int(x) for x in vf.shape[2:]), audio_dim=int(af.shape[2]),
                   n_segments=n_segments, n_failed_excluded=len(failed), failed=failed,
                   n_short=int((short & kept).sum()),
                   provenance={"visual": vattrs.get("provenance", vattrs), "audio": aattrs.get("provenance", aattrs)})


def standardize(data: AVEData) -> dict:
    """Per-channel z-scoring of both modalities with train-split statistics, in place.

    Off by default (the papers feed raw pretrained features). The demo turns it on: random
    encoder weights give features of arbitrary scale (random Cnn14/VGGish embeddings are
    ~1e-3), which no head's default learning rate can use. Returns the statistics' summary.
    """
    out = {}
    for name in ("visual", "audio"):
        tr = getattr(data.splits["train"], name).float()
        flat = tr.reshape(-1, tr.shape[-1])
        mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6 * float(flat.std()) + 1e-12)
        for split in data.splits.values():
            t = getattr(split, name)
            setattr(split, name, ((t.float() - mean) / std).to(t.dtype))
        out[name] = {"mean_of_means": float(mean.mean()), "mean_of_stds": float(std.mean())}
    data.provenance["standardize"] = out
    return out


def data_from_arrays(visual, audio, segment_labels, split, video_ids=None) -> AVEData:
    """AVEData straight from arrays (tests, benchmarks): labels (N,T,29) one-hot, split (N,)."""
    seg = torch.as_tensor(np.asarray(segment_labels, np.float32))
    mask = (seg[..., BACKGROUND] < 0.5).float()
    cls = seg[..., :BACKGROUND].sum(1)                          # (N,28) event seconds per class
    video = torch.zeros(seg.shape[0], NUM_CLASSES + 1)
    video[:, :NUM_CLASSES] = (cls > 0).float()
    split = np.asarray(split).astype(str)
    ids = np.asarray(video_ids if video_ids is not None else [f"v{i}" for i in range(len(split))]).astype(str)
    vt = visual if isinstance(visual, torch.Tensor) else torch.from_numpy(np.asarray(visual))
    at = audio if isinstance(audio, torch.Tensor) else torch.from_numpy(np.asarray(audio))
    out = {}
    for s in SPLITS:
        r = torch.as_tensor(np.flatnonzero(split == s))
        out[s] = SplitData(vt[r], at[r], seg[r], mask[r], video[r], list(ids[r.numpy()]), r.numpy())
    return AVEData(out, tuple(vt.shape[2:]), int(at.shape[2]), int(seg.shape[1]))


# --------------------------------------------------------------------------- batches
_KEYS = ("visual", "audio", "segment_labels", "event_mask", "video_label")


class BatchFeeder:
    """Training batches gathered into reused buffers, one batch ahead in a worker thread.

    Why: a fresh (64,10,7,7,512) float32 batch per step costs more in page faults than
    the copy itself (REFERENCE §2 saw the same with freed activation buffers), and
    light heads (A-only, V-only) would wait on data for a large share of the epoch.
    ``index_select(out=...)`` into two buffer sets used alternately removes both costs;
    the gather releases the GIL, so it overlaps the previous step's compute.
    Heads must not keep references to batch tensors across steps (copy what you keep).
    Modalities a head does not read (class attribute ``inputs``) are passed as
    zero-stride placeholders of the right shape.
    """

    def __init__(self, split: SplitData, batch_size: int, device, inputs=("visual", "audio")):
        self.split, self.bs, self.device = split, batch_size, torch.device(device)
        self.inputs = tuple(inputs)
        self.bufs = [self._alloc() for _ in range(2)]
        self._pool = None

    def _alloc(self) -> dict:
        out = {}
        for k in _KEYS:
            src = getattr(self.split, k)
            if k in ("visual", "audio") and k not in self.inputs:
                out[k] = None
                continue
            shape = (self.bs, *src.shape[1:])
            out[k] = torch.empty(shape, dtype=torch.float32, device=self.device)
            if src.dtype != torch.float32 or src.device != self.device:
                out[k + ":stage"] = torch.empty(shape, dtype=src.dtype, device=src.device)
        return out

    def _fill(self, slot: int, idx: torch.Tensor) -> dict:
        buf, k_ = self.bufs[slot], len(idx)
        b = {}
        for k in _KEYS:
            src = getattr(self.split, k)
            if buf[k] is None:
                b[k] = torch.zeros((), dtype=torch.float32, device=self.device).expand(k_, *src.shape[1:])
                continue
            dst = buf[k][:k_]
            stage = buf.get(k + ":stage")
            if stage is None:
                torch.index_select(src, 0, idx, out=dst)
            else:
                torch.index_select(src, 0, idx, out=stage[:k_])
                dst.copy_(stage[:k_], non_blocking=True)
            b[k] = dst
        return b

    def epoch(self, perm: torch.Tensor):
        """Yield (batch dict, seconds waited for it) for consecutive slices of ``perm``."""
        from concurrent.futures import ThreadPoolExecutor

        chunks = [perm[lo:lo + self.bs] for lo in range(0, len(perm), self.bs)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avepipe-batches")
        nxt = self._pool.submit(self._fill, 0, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            t = time.perf_counter()
            b = nxt.result()
            if i + 1 < len(chunks):   # the other slot was used by step i-1, which has finished
                nxt = self._pool.submit(self._fill, (i + 1) % 2, chunks[i + 1])
            yield b, time.perf_counter() - t

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# --------------------------------------------------------------------------- helpers
def _make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    kind = cfg["optimizer"].lower()
    lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay") or 0.0)
    params = list(params)
    # fused: one kernel per parameter instead of ~10 (same update, to float rounding); the
    # per-op loop costs CACE-Net's 154 tensors ~4x the fused step on a 2-core CPU
    fused = {"fused": True} if params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **fused)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(cfg.get("momentum", 0.9)))
    raise ValueError(f"unknown optimizer {kind!r} (adam | adamw | sgd)")


def lr_factor(epoch: int, cfg: dict) -> float:
    """Multiplier of the base lr during ``epoch`` (0-based): linear warmup then the schedule.

    multistep: gamma ** (#milestones <= epoch) (MultiStepLR stepped per epoch);
    cosine: half cosine from 1 to 0 over the epochs after warmup (CosineAnnealingLR).
    """
    sched = cfg.get("schedule") or {"kind": "none"}
    warm = int(cfg.get("warmup_epochs") or 0)
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    kind = sched.get("kind", "none")
    if kind == "none":
        return 1.0
    if kind == "multistep":
        return float(sched.get("gamma", 0.1)) ** sum(epoch >= m for m in sched.get("milestones", []))
    if kind == "cosine":
        total = max(int(cfg["epochs"]) - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / total))
    raise ValueError(f"unknown schedule kind {kind!r} (multistep | cosine | none)")


def _rng_state(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "shuffle": gen.get_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["shuffle"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _nan_to_none(x: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, float)]


@contextlib.contextmanager
def _reuse_freed_memory():
    """glibc only: keep freed memory in the heap for the next step instead of unmapping it.

    Why: each (B*T, 49, 512) activation is a fresh 64+ MB mmap that is unmapped when freed,
    so every step page-faults all its activations in again; on CACE-Net that costs ~30% of
    the step's CPU time (measured), at the price of a higher peak RSS (fragmentation).
    No change to any result; the glibc defaults are restored (and the heap trimmed) after.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to tune
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, 65536)               # glibc defaults
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        trim(0)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, split: SplitData, setting: str, device, *, batch_size: int = 256,
             precision: str = "float32") -> dict:
    """Predictions and scores of ``model`` on one split.

    full/weak: {"acc", "pred" (N,T), "target" (N,T)}; cml: {"acc" (= mean of A2V/V2A),
    "A2V", "V2A", "average"} from ``embed_cml`` and ``metrics.cml_accuracy``.
    """
    model.eval()
    n = len(split)
    if n == 0:
        return {"acc": float("nan")}
    preds, vs, as_ = [], [], []
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, n), device=split.visual.device)
        b = split.batch(idx, device)
        with _autocast(device, precision):
            if setting == "cml":
                v, a = model.embed_cml(b["visual"], b["audio"])
                vs.append(v.float().cpu())
                as_.append(a.float().cpu())
            else:
                preds.append(model.predict(model(b["visual"], b["audio"])).cpu())
    if setting == "cml":
        accs = M.cml_accuracies(torch.cat(vs), torch.cat(as_), split.event_mask.cpu())
        return {"acc": accs["average"], **accs}
    pred = torch.cat(preds).numpy()
    target = split.segment_labels.argmax(-1).cpu().numpy()
    return {"acc": M.segment_accuracy(pred, target), "pred": pred, "target": target}


PRECISIONS = ("float32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """Raise on an unknown ``precision``; warn where bf16 has no hardware support (it still
    runs, emulated, slower than float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("precision bf16 on a CPU without native bf16 (AVX512-BF16/AMX): emulated, "
                    "expect it slower than float32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("precision bf16 on a GPU without bf16 support: emulated, expect it slow")


def _autocast(device: torch.device, precision: str):
    """bf16: autocast (matmuls, convolutions, LSTMs in bf16, reductions and losses in float32;
    weights, optimizer state and gradients stay float32). float32: no autocast."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- training
def train_head(head_name: str, setting: str, data: AVEData, out_dir: str | Path, *, seed: int,
               select_on: str = "val", epochs: int | None = None, batch_size: int | None = None,
               lr: float | None = None, device: str = "auto", resume: bool = True,
               progress: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
               precision: str = "float32", eval_batch_size: int = 64, config: dict | None = None,
               reuse_freed_memory: bool = False, **hparams) -> dict:
    """Train ``head_name`` in ``setting`` on ``data``; returns the metrics dict (also metrics.json).

    Optimizer, schedule, clipping, epochs and batch size come from the head module's
    ``TRAIN_DEFAULTS[setting]``; ``epochs``/``batch_size``/``lr`` override them and
    ``hparams`` go to the head constructor. ``select_on``: "val" (default) picks the
    epoch with the best val score; "test" reproduces the published protocol (best epoch
    on TEST, optimistic) and says so in metrics and log; "last" takes the final epoch.
    ``on_epoch_end(epoch, record)`` is called after the epoch's checkpoint is written.
    ``precision``: "float32" (default) or "bf16" (autocast on CPU and CUDA; on CPUs with AMX /
    AVX512-BF16 about twice as fast, see benchmarks/train.py). ``config``: recorded in provenance.
    ``reuse_freed_memory``: glibc keeps freed activations for the next step instead of
    page-faulting them in again (CACE-Net: ~30% less CPU time per step, but 0.3-0.8 GB higher
    peak RSS from heap fragmentation, hence off by default); results identical.
    """
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_defaults(head_name, setting)
    for key, val in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if val is not None:
            cfg[key] = val
    n_epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    dev = resolve_device(device)
    train, val, test = (data.splits[s] for s in SPLITS)
    if len(train) == 0:
        raise ValueError("no training samples")
    if select_on == "val" and len(val) == 0:
        raise ValueError("select_on='val' but the val split is empty")
    if len(test) == 0:
        raise ValueError("no test samples")
    weak = setting == "weak"
    run_config = {"head": head_name, "setting": setting, "seed": int(seed), "select_on": select_on,
                  "train": cfg, "hparams": hparams, "precision": precision, "data": data.summary()}
    check_precision(precision, dev)

    with _deterministic(dev.type == "cpu" or precision == "float32"), \
            (_reuse_freed_memory() if reuse_freed_memory else contextlib.nullcontext()):
        # ------------------------------------------------------------------ setup (seeded)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = build(head_name, data.visual_shape, data.audio_dim, setting, **hparams).to(dev)
        opt = _make_optimizer(model.parameters(), cfg)
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        train_d, val_d, test_d = train.to(dev), val.to(dev), test.to(dev)
        if weak:
            # weak supervision: the loss may only read video labels; poison the segment-level
            # ones so that any use turns the loss non-finite and stops training loudly.
            train_d = SplitData(train_d.visual, train_d.audio, torch.full_like(train_d.segment_labels, float("nan")),
                                torch.full_like(train_d.event_mask, float("nan")), train_d.video_label,
                                train_d.video_ids, train_d.samples)

        start_epoch, best = 0, {"epoch": -1, "score": -math.inf, "state": None}
        ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
        history: list[dict] = []
        if resume and ckpt_path.exists():
            ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
            if _canon(ck["run_config"]) != _canon(run_config):
                raise ValueError(f"{ckpt_path} was written by a different run configuration; "
                                 f"remove it or pass resume=False\n  have: {ck['run_config']}\n  want: {run_config}")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            _set_rng_state(ck["rng"], gen)
            best = ck["best"]
            start_epoch = int(ck["epoch"]) + 1
            history = [r for r in _read_log(log_path) if r["epoch"] <= ck["epoch"]]
        _rewrite_log(log_path, history)   # drops lines of an epoch that never reached its checkpoint

        feeder = BatchFeeder(train_d, bs, dev, getattr(model, "inputs", ("visual", "audio")))
        bar = _tqdm(range(start_epoch, n_epochs), progress, head_name, setting, start_epoch, n_epochs)
        try:
            for epoch in bar:
                t0 = time.perf_counter()
                factor = lr_factor(epoch, cfg)
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                model.train()
                perm = torch.randperm(len(train_d), generator=gen).to(train_d.visual.device)
                sums: dict[str, float] = {}
                total, seen, data_s = 0.0, 0, 0.0
                for step, (b, waited) in enumerate(feeder.epoch(perm)):
                    data_s += waited
                    with _autocast(dev, precision):
                        outp = model(b["visual"], b["audio"])
                        loss, parts = model.loss(outp, b, epoch, n_epochs)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss {float(loss.detach())} at epoch {epoch}, batch {step}"
                            + (" (weak setting: the head read segment labels / event mask, which are NaN here)"
                               if weak else ""))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.get("clip_grad_norm"):
                        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["clip_grad_norm"]))
                    opt.step()
                    k = len(b["audio"])
                    total += float(loss.detach()) * k
                    for name, v in parts.items():
                        sums[name] = sums.get(name, 0.0) + float(v) * k
                    seen += k
                train_s = time.perf_counter() - t0
                te = time.perf_counter()
                ev_val = evaluate(model, val_d, setting, dev, batch_size=eval_batch_size, precision=precision)
                ev_test = evaluate(model, test_d, setting, dev, batch_size=eval_batch_size, precision=precision)
                eval_s = time.perf_counter() - te
                score = {"val": ev_val["acc"], "test": ev_test["acc"], "last": float(epoch)}[select_on]
                selected = bool(score > best["score"])      # ties keep the earlier epoch
                if selected:
                    best = {"epoch": epoch, "score": score,
                            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                rec = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": total / seen,
                       "losses": {k: v / seen for k, v in sums.items()},
                       "val_acc": _f(ev_val["acc"]), "test_acc": _f(ev_test["acc"]),
                       **({"val_cml": _cml(ev_val), "test_cml": _cml(ev_test)} if setting == "cml" else {}),
                       "select_on": select_on, "selected": selected, "best_epoch": best["epoch"],
                       "time_s": time.perf_counter() - t0, "train_s": train_s, "data_s": data_s,
                       "eval_s": eval_s, "data_share": data_s / train_s if train_s > 0 else 0.0}
                history.append(rec)
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                _atomic_save({"run_config": run_config, "epoch": epoch, "model": model.state_dict(),
                              "optimizer": opt.state_dict(),
                              "scheduler": {"schedule": cfg.get("schedule"), "warmup_epochs": cfg.get("warmup_epochs"),
                                            "lr_factor": factor},
                              "rng": _rng_state(gen), "best": best}, ckpt_path)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", val=f"{ev_val['acc']:.3f}", best=best["epoch"])
                if on_epoch_end is not None:
                    on_epoch_end(epoch, rec)
        finally:
            feeder.close()

        # ------------------------------------------------------------------ final metrics
        if best["state"] is None:
            raise RuntimeError("no epoch was trained (epochs=0?)")
        model.load_state_dict(best["state"])
        ev = evaluate(model, test_d, setting, dev, batch_size=eval_batch_size, precision=precision)
        ev_val = evaluate(model, val_d, setting, dev, batch_size=eval_batch_size, precision=precision) if len(val_d) else {}
    torch.save({"model": best["state"], "run_config": run_config, "epoch": best["epoch"]}, out / "best.pt")
    result = _metrics(head_name, setting, select_on, best["epoch"], ev, ev_val, data, run_config, config, n_epochs)
    _write_json(result, out / "metrics.json")
    try:
        plot_learning_curve(history, out / "learning_curve.png", title=f"{head_name} / {setting} / seed {seed}",
                            select_on=select_on, best_epoch=best["epoch"])
    except Exception as e:  # a plot must never cost a finished training
        print(f"warning: learning curve not written: {e}")
    return result


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _cml(ev: dict) -> dict | None:
    return {k: ev[k] for k in ("A2V", "V2A", "average")} if "A2V" in ev else None


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a kill
                break
    return out


def _rewrite_log(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def _tqdm(it, progress: bool, head: str, setting: str, start: int, total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:   # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, total=total, initial=start, disable=not progress, desc=f"{head}/{setting}",
                unit="epoch", dynamic_ncols=True)


def _metrics(head, setting, select_on, best_epoch, ev, ev_val, data: AVEData, run_config, config, n_epochs) -> dict:
    from avepipe.provenance import provenance

    res: dict[str, Any] = {
        "head": head, "setting": setting, "seed": run_config["seed"],
        "select_on": select_on,
        "protocol": ("published protocol: epoch selected on the TEST split (optimistic)" if select_on == "test"
                     else "epoch selected on the val split" if select_on == "val" else "last epoch"),
        "selected_epoch": int(best_epoch), "epochs": n_epochs,
        "n_failed_excluded": data.n_failed_excluded,
        "n_train": len(data.splits["train"]), "n_val": len(data.splits["val"]), "n_test": len(data.splits["test"]),
        "n_short": data.n_short,
    }
    if setting == "cml":
        res["accuracy"] = ev["average"]
        res["cml"] = {"A2V": ev["A2V"], "V2A": ev["V2A"], "average": ev["average"]}
        if ev_val:
            res["val_cml"] = _cml(ev_val)
    else:
        res["accuracy"] = ev["acc"]
        res["per_class_accuracy"] = _nan_to_none(M.per_class_accuracy(ev["pred"], ev["target"], NUM_CLASSES + 1))
        res["confusion_matrix"] = M.confusion_matrix(ev["pred"], ev["target"], NUM_CLASSES + 1).tolist()
        if ev_val:
            res["val_accuracy"] = ev_val["acc"]
    res["train_config"] = run_config["train"]
    res["hparams"] = run_config["hparams"]
    # fingerprint the file that holds the head (baselines.py holds avel/audio_only/visual_only)
    module_file = HEADS[head].partition(":")[0].rsplit(".", 1)[-1]
    res["provenance"] = provenance(f"heads:{module_file}", config or {}, features=data.provenance,
                                   run=copy.deepcopy({k: run_config[k] for k in ("head", "setting", "seed")}))
    return res


def plot_learning_curve(history: list[dict], path: str | Path, title: str = "", select_on: str = "val",
                        best_epoch: int | None = None) -> Path:
    """Loss and val/test score per epoch, the selected epoch marked."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(ep, [r["loss"] for r in history], label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key in ("val_acc", "test_acc"):
        ax2.plot(ep, [np.nan if r[key] is None else r[key] for r in history], label=key.replace("_", " "))
    if best_epoch is not None and best_epoch >= 0:
        ax2.axvline(best_epoch, color="k", ls="--", lw=0.8, label=f"selected ({select_on})")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def train_from_cli(a) -> int:
    """`avepipe train --format ave ...`: open the stores aligned with the manifest, train, evaluate."""
    from avepipe.cli import _kv
    from avepipe.store import open_features

    manifest = pd.read_parquet(a.manifest)
    ids = manifest["video_id"].astype(str).tolist()
    visual = open_features([Path(p) for p in a.visual], video_ids=ids)
    audio = open_features([Path(p) for p in a.audio_features], video_ids=ids)
    data = load_ave_data(manifest, visual, audio)
    if getattr(a, "normalize", "none") == "standardize":
        standardize(data)
    config = {k: v for k, v in vars(a).items() if k != "fn"}
    train_head(a.head, a.setting, data, Path(a.out_dir), seed=a.seed, select_on=a.select_on,
               epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, device=a.device,
               progress=not a.no_progress, config=config, precision=getattr(a, "precision", "float32"),
               **_kv(a.hparam))
    return 0
