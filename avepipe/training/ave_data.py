"""AVE data for the heads loop: the sample manifest plus a visual and an audio feature store,
as tensors per split, and the batch feeder that gathers training batches.

The features stay in memory as tensors (float16 stays float16 and is cast per batch) and
batches are gathered by index, so there is no per-sample Python work. Features are read
from disk in one place, ``read_store``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from avepipe.datasets.labels import BACKGROUND, NUM_CLASSES, ave_label_arrays
from avepipe.training.harness import zscore, zscore_stats

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """One split's tensors; rows are samples (manifest rows), in manifest order."""

    visual: torch.Tensor            # (N,T,...) float16/float32
    audio: torch.Tensor             # (N,T,Ca)
    segment_labels: torch.Tensor    # (N,T,29) one-hot, background = 28 (NaN: unknown, weak only)
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
    n_extra_train: int = 0         # train-only samples without segment labels (append_train_only)

    def summary(self) -> dict:
        return {"n_" + k: len(v) for k, v in self.splits.items()} | {
            "n_failed_excluded": self.n_failed_excluded, "n_short": self.n_short,
            "visual_shape": list(self.visual_shape), "audio_dim": self.audio_dim,
            "n_segments": self.n_segments} | ({"n_extra_train": self.n_extra_train} if self.n_extra_train else {})


class DataMismatchError(ValueError):
    """Manifest and feature stores do not describe the same samples."""


# --------------------------------------------------------------------------- reading
def read_store(paths: str | os.PathLike | Sequence, video_ids: Sequence[str]):
    """A feature store opened with rows ``video_ids`` (nothing read yet: ``load_ave_data``
    reads what it keeps with the store's fast path, ``FeatureSet.read``, checksums checked)."""
    from avepipe.store import open_features

    return open_features(paths, video_ids=list(video_ids))


def _unpack(fs, name: str, n_rows: int):
    """(features, video_ids|None, status|None, reason|None, lengths|None, attrs) of a FeatureSet or array."""
    if hasattr(fs, "features"):
        # a store's FeatureSet stays itself: read later, once, with its fast path
        feats = fs if hasattr(fs, "read") and hasattr(fs, "shape") else fs.features
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
    return _cast(t, dtype)


def _read_splits(feats, rows: dict[str, np.ndarray], dtype) -> dict[str, torch.Tensor]:
    """The kept rows of every split as tensors. A store is read once, in split order, with its
    fast path (chunk files straight into one array); the splits are views of that array."""
    if not hasattr(feats, "read"):
        return {s: _materialise(feats, r, dtype) for s, r in rows.items()}
    whole = torch.from_numpy(feats.read(np.concatenate([rows[s] for s in SPLITS])))
    parts = torch.split(whole, [len(rows[s]) for s in SPLITS])
    return {s: _cast(p, dtype) for s, p in zip(SPLITS, parts)}


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    if dtype is not None:
        return t.to(dtype)
    return t.float() if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) else t


def load_ave_data(manifest: pd.DataFrame, visual, audio, *, split_column: str = "split",
                  n_segments: int = 10, dtype: torch.dtype | None = None) -> AVEData:
    """Tensors per split from the sample manifest and two feature stores.

    ``visual``/``audio``: ``FeatureSet`` (``avepipe.store.open_features(path,
    video_ids=manifest.video_id)``), a path (or paths) to read with ``read_store``, or plain
    (N,T,...) arrays whose rows are the manifest's rows. A sample is excluded (and counted)
    when the manifest says its file is missing or decoding failed, or either store's status
    is not ``ok``. Mismatched ids, T or shapes raise ``DataMismatchError`` before any
    training. ``split_column`` picks another split (e.g. the CML "match" split) when present.
    ``dtype``: storage dtype in memory (default: keep float16/float32, float64 -> float32).
    """
    man = manifest.reset_index(drop=True)
    for col in ("video_id", split_column, "label", "start", "end"):
        if col not in man.columns:
            raise DataMismatchError(f"manifest lacks column {col!r}")
    ids = man["video_id"].astype(str).to_numpy()
    opened = []
    for name, fs in (("visual", visual), ("audio", audio)):
        if isinstance(fs, (str, os.PathLike)) or (isinstance(fs, (list, tuple)) and fs
                                                  and isinstance(fs[0], (str, os.PathLike))):
            fs = read_store(fs, ids)
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
    rows = {s: np.flatnonzero((splits == s) & kept) for s in SPLITS}
    vparts, aparts = _read_splits(vf, rows, dtype), _read_splits(af, rows, dtype)
    out: dict[str, SplitData] = {}
    for s in SPLITS:
        out[s] = SplitData(
            visual=vparts[s], audio=aparts[s],
            segment_labels=torch.from_numpy(seg[rows[s]]), event_mask=torch.from_numpy(mask[rows[s]]),
            video_label=torch.from_numpy(video[rows[s]]), video_ids=list(ids[rows[s]]), samples=sample[rows[s]])
    failed = [{"sample": int(sample[i]), "video_id": str(ids[i]), "split": str(splits[i]),
               "reason": str(reason[i])} for i in np.flatnonzero(~kept)]
    return AVEData(splits=out, visual_shape=tuple(int(x) for x in vf.shape[2:]), audio_dim=int(af.shape[2]),
                   n_segments=n_segments, n_failed_excluded=len(failed), failed=failed,
                   n_short=int((short & kept).sum()),
                   provenance={"visual": vattrs.get("provenance", vattrs), "audio": aattrs.get("provenance", aattrs)})


def append_train_only(data: AVEData, visual, audio, video_label, video_ids: Sequence[str]) -> AVEData:
    """Add training samples that have video labels but no segment labels, in place (the
    weak setting's extra videos, e.g. AVE's background-only "noisy" videos of the released
    ``*_noisy.h5``; reading those is the store's business). Their segment labels and event
    masks are NaN: the weak loop never reads them, and the full / cml loops refuse them.

    ``visual`` (N,T,...) and ``audio`` (N,T,Ca) as the other samples', ``video_label`` (N,29).
    """
    tr = data.splits["train"]
    v, a = torch.as_tensor(np.asarray(visual)), torch.as_tensor(np.asarray(audio))
    lab = torch.as_tensor(np.asarray(video_label, np.float32))
    n = len(video_ids)
    if v.shape[1:] != tr.visual.shape[1:] or a.shape[1:] != tr.audio.shape[1:] or tuple(lab.shape) != (n, NUM_CLASSES + 1):
        raise DataMismatchError(f"extra train samples: visual {tuple(v.shape)}, audio {tuple(a.shape)}, video labels "
                                f"{tuple(lab.shape)} do not match the train split ({tuple(tr.visual.shape[1:])}, "
                                f"{tuple(tr.audio.shape[1:])}, {n} x {NUM_CLASSES + 1})")
    unknown_seg = torch.full((n, *tr.segment_labels.shape[1:]), float("nan"))
    data.splits["train"] = SplitData(torch.cat([tr.visual, v.to(tr.visual.dtype)]),
                                     torch.cat([tr.audio, a.to(tr.audio.dtype)]),
                                     torch.cat([tr.segment_labels, unknown_seg]),
                                     torch.cat([tr.event_mask, torch.full((n, tr.event_mask.shape[1]), float("nan"))]),
                                     torch.cat([tr.video_label, lab]), tr.video_ids + list(map(str, video_ids)),
                                     np.concatenate([tr.samples, np.full(n, -1)]))
    data.n_extra_train += n
    return data


def standardize(data: AVEData) -> dict:
    """Per-channel z-scoring of both modalities with train-split statistics, in place.

    Off by default (the papers feed raw pretrained features). The demo turns it on: random
    encoder weights give features of arbitrary scale (random Cnn14/VGGish embeddings are
    ~1e-3), which no head's default learning rate can use. Returns the statistics' summary.
    """
    out = {}
    for name in ("visual", "audio"):
        mean, std = zscore_stats(getattr(data.splits["train"], name))
        for split in data.splits.values():
            setattr(split, name, zscore(getattr(split, name), mean, std))
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

    Why: a fresh (64,10,7,7,512) float32 batch per step costs more in page faults than the
    copy itself, and light heads (A-only, V-only) would wait on data for a large share of
    the epoch. ``index_select(out=...)`` into two buffer sets used alternately removes both
    costs; the gather releases the GIL, so it overlaps the previous step's compute.
    Heads must not keep references to batch tensors across steps (copy what you keep).
    Modalities a head does not read (class attribute ``inputs``) are passed as zero-stride
    placeholders of the right shape.
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


__all__ = ["SPLITS", "SplitData", "AVEData", "DataMismatchError", "read_store", "load_ave_data",
           "append_train_only", "standardize", "data_from_arrays", "BatchFeeder"]
