"""UnAV-100 data for the dense head: ragged window/hop feature stores plus the manifest's events.

Features come from ragged stores (window/hop steps, ``lengths``, ``timestamps``); events
from the manifest's UnAV-100 annotations. Bad input (documented handling, each reported with
the video id in a logged warning and in ``metrics.json["warnings"]``):
  * events that end after the video's features (features shorter than the annotation,
    e.g. extraction keeps whole seconds) are clipped to the time the features cover;
  * events wholly past the features are dropped;
  * events outside [0, duration] are clipped to it; events of zero or negative length and
    events with an unknown label id are dropped;
  * videos failed in decode (manifest ``status``) or in extraction (store ``status``), or
    with no feature step, are excluded and counted.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from avepipe.training.harness import zscore, zscore_stats

log = logging.getLogger(__name__)


@dataclass
class DenseData:
    video_ids: list[str]
    split: np.ndarray
    visual: list[np.ndarray]  # per video (T_i, Cv) float32 (float16 stores stay float16)
    audio: list[np.ndarray]  # per video (T_i, Ca)
    t0: np.ndarray  # first window start (s)
    hop: float
    window: float
    duration: np.ndarray
    events: list[np.ndarray]  # per video (E,3): start s, end s, label id
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # {"visual", "audio"} store provenance; "standardize"
    # ground truth of val / test from the annotations (metrics.unav_ground_truth): every annotated
    # video counts, so one that failed to decode or extract is all missed, not left out
    gt: dict = field(default_factory=dict)

    def subset(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == split]

    def summary(self) -> dict:
        return {"n_" + s: len(self.subset(s)) for s in ("train", "val", "test")} | {
            "visual_dim": int(self.visual[0].shape[1]) if self.visual else 0,
            "audio_dim": int(self.audio[0].shape[1]) if self.audio else 0, "hop": self.hop, "window": self.window,
            "n_classes": len(self.classes), "n_events": int(sum(len(e) for e in self.events))}


def _pool(x: np.ndarray) -> np.ndarray:
    """(L, H, W, C) maps -> (L, C) spatial means (the baseline uses pooled 2048-d features)."""
    if x.ndim <= 2:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float32).mean(1)


def _read_rows(fs, rows: dict[int, int]) -> dict[int, np.ndarray]:
    """Real steps of the store rows in ``rows`` ({store row: L}), pooled, read one dask block
    at a time (per-row dask indexing would read a whole ~64 MiB block per video).
    Pooled (L, C) stores keep their float dtype (float16 stays float16: half the memory);
    pooled maps are float32 means."""
    out: dict[int, np.ndarray] = {}
    keep = np.float16 if fs.features.dtype == np.float16 and fs.features.ndim == 3 else np.float32
    bounds = np.cumsum((0,) + fs.features.chunks[0])
    for b in range(len(bounds) - 1):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        want = [r for r in range(lo, hi) if r in rows]
        if not want:
            continue
        block = fs.features.blocks[b][: want[-1] - lo + 1].compute(scheduler="synchronous")
        for r in want:
            # a copy, not a view: a view would keep the whole ~64 MiB block alive
            out[r] = np.array(_pool(block[r - lo, : rows[r]]), dtype=keep, order="C", copy=True)
        del block
    return out


def _store_rows(fs, ids: list[str], what: str) -> list[int]:
    pos = {str(v): i for i, v in enumerate(fs.video_ids)}
    missing = [v for v in ids if v not in pos]
    if missing:
        raise KeyError(f"{len(missing)} video(s) decoded ok but absent from the {what} feature store "
                       f"{fs.attrs.get('shards', [])[:1]}...: {missing[:5]}")
    return [pos[v] for v in ids]


def load_dense_data(manifest: pd.DataFrame, visual_paths: Sequence[Path], audio_paths: Sequence[Path],
                    classes: Sequence[str] | None = None) -> DenseData:
    """Features and events of every usable video (see the module docstring for bad input).

    ``manifest``: index/manifest rows (``video_id``, ``split``, ``duration``, ``events`` JSON,
    ``status``). ``visual_paths`` / ``audio_paths``: feature shards or directories of them,
    written with window/hop (``attrs["provenance"]["window"|"hop"]``). ``classes``: names by
    label id (default: the names found in the events, then ``UNAV_CLASSES``); events with an
    id outside it are dropped.
    """
    from avepipe.datasets.unav100 import UNAV_CLASSES
    from avepipe.store import open_features

    missing = [c for c in ("video_id", "split", "duration", "events", "status") if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing} (UnAV-100 manifest expected)")
    ok = manifest[manifest["status"] == "ok"].drop_duplicates("video_id").reset_index(drop=True)
    n_failed = int((manifest["status"] != "ok").sum())
    ids = ok["video_id"].astype(str).tolist()
    vs = open_features([Path(p) for p in visual_paths])
    au = open_features([Path(p) for p in audio_paths])
    pv, pa = vs.attrs.get("provenance", {}), au.attrs.get("provenance", {})
    hop = float(pv.get("hop") or pa.get("hop") or 0)
    window = float(pv.get("window") or pa.get("window") or 0)
    if not hop or not window:
        raise ValueError("dense head needs window/hop feature stores (config `windows:`); "
                         f"{vs.attrs.get('shards', ['?'])[0]} carries none in attrs['provenance']")
    for name, p in (("audio", pa), ("visual", pv)):
        if p.get("hop") and abs(float(p["hop"]) - hop) > 1e-9 or p.get("window") and abs(float(p["window"]) - window) > 1e-9:
            raise ValueError(f"{name} window/hop {p.get('window')}/{p.get('hop')} != {window}/{hop}: "
                             "visual and audio features are not aligned")
    rv, ra = _store_rows(vs, ids, "visual"), _store_rows(au, ids, "audio")
    warns: list[str] = []
    use, n_bad = [], 0
    for i, vid in enumerate(ids):
        if vs.status[rv[i]] != "ok" or au.status[ra[i]] != "ok":
            why = vs.reason[rv[i]] if vs.status[rv[i]] != "ok" else au.reason[ra[i]]
            warns.append(f"{vid}: feature extraction failed ({why}); excluded")
            n_bad += 1
        elif min(vs.lengths[rv[i]], au.lengths[ra[i]]) < 1:
            warns.append(f"{vid}: no feature step; excluded")
            n_bad += 1
        else:
            use.append(i)
    L = {i: int(min(vs.lengths[rv[i]], au.lengths[ra[i]])) for i in use}
    vis = _read_rows(vs, {rv[i]: L[i] for i in use})
    aud = _read_rows(au, {ra[i]: L[i] for i in use})

    parsed = {i: json.loads(ok.loc[i, "events"] or "[]") for i in use}
    names: dict[int, str] = {}
    for evs in parsed.values():
        for e in evs:
            if isinstance(e.get("label_id"), int) and e["label_id"] >= 0:
                names.setdefault(int(e["label_id"]), str(e.get("label", "")))
    if classes is None:
        n = max(names) + 1 if names else 1
        classes = [names.get(k) or (UNAV_CLASSES[k] if k < len(UNAV_CLASSES) else f"class_{k}") for k in range(n)]
    classes = list(classes)

    visual, audio, events, t0 = [], [], [], []
    for i in use:
        vid, dur = ids[i], float(ok.loc[i, "duration"])
        ts = vs.timestamps[rv[i]]
        start = float(ts[0]) if np.isfinite(ts[0]) else 0.0
        covered = start + (L[i] - 1) * hop + window  # end of the last feature window
        ev = []
        for e in parsed[i]:
            lid = e.get("label_id")
            try:
                s, t = map(float, e["segment"])
            except (KeyError, TypeError, ValueError):
                warns.append(f"{vid}: event {e!r} has no [t0, t1] segment; dropped")
                continue
            what = f"event {e.get('label')!r} [{s:.2f}, {t:.2f}]"
            if not isinstance(lid, int) or not 0 <= lid < len(classes):
                warns.append(f"{vid}: {what} has unknown label_id {lid!r}; dropped")
                continue
            c0, c1 = max(s, 0.0), min(t, dur)
            if (c0, c1) != (s, t) and c1 > c0:
                warns.append(f"{vid}: {what} outside [0, {dur:.2f}] s; clipped to [{c0:.2f}, {c1:.2f}]")
            if c1 <= c0:
                warns.append(f"{vid}: {what} has zero or negative length within [0, {dur:.2f}] s; dropped")
                continue
            if c0 >= covered:
                warns.append(f"{vid}: {what} starts after the features end ({covered:.2f} s); dropped")
                continue
            if c1 > covered + 1e-6:
                warns.append(f"{vid}: {what} clipped to the features' end {covered:.2f} s "
                             f"(features shorter than the annotation)")
                c1 = covered
            ev.append((c0, c1, lid))
        visual.append(vis[rv[i]])
        audio.append(aud[ra[i]])
        events.append(np.asarray(ev, dtype=np.float64).reshape(-1, 3))
        t0.append(start)
    for w in warns:
        log.warning("%s", w)
    if n_failed or n_bad:
        warns.append(f"excluded {n_failed} video(s) failed in decode and {n_bad} failed in feature extraction")
    log.info("dense data: %d videos (%d failed in decode, %d failed in extraction)", len(use), n_failed, n_bad)
    sub = ok.loc[use]
    from avepipe.metrics import unav_ground_truth

    used = [ids[i] for i in use]
    gt = {s: unav_ground_truth(manifest, s, evaluated=used) for s in ("val", "test")}
    return DenseData(used, sub["split"].astype(str).to_numpy(), visual, audio, np.asarray(t0),
                     hop, window, sub["duration"].to_numpy(dtype=float), events, classes, warns,
                     provenance={"visual": pv, "audio": pa}, gt=gt)


def standardize_dense(data: DenseData) -> dict:
    """Per-channel z-scoring with train-split statistics, in place (the AVE loop's z-score:
    avepipe.training.harness.zscore). Returns the statistics' summary."""
    train = data.subset("train")
    out = {}
    for name in ("visual", "audio"):
        seqs = getattr(data, name)
        mean, std = zscore_stats(torch.from_numpy(np.concatenate([seqs[i] for i in train])))
        setattr(data, name, [zscore(torch.from_numpy(x), mean, std).numpy() for x in seqs])
        out[name] = {"mean_of_means": float(mean.mean()), "mean_of_stds": float(std.mean())}
    data.provenance["standardize"] = out
    return out


# ---------------------------------------------------------------- time <-> step coordinates
def to_steps(t: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    """Seconds -> finest-level coordinates where feature i (its window's centre) sits at i
    (the baseline: (t * fps - num_frames / 2) / feat_stride)."""
    return (t - (t0 + window / 2)) / hop


def to_seconds(u: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    """Inverse of ``to_steps`` (the baseline: (u * feat_stride + num_frames / 2) / fps)."""
    return u * hop + t0 + window / 2


def make_batch(data: DenseData, idx: Sequence[int], levels: int, device):
    """Padded (B, T, C) visual / audio, (B, T) mask, events in step coordinates, lengths;
    T is a multiple of the pyramid's coarsest stride."""
    mult = 2 ** (levels - 1)
    lengths = [len(data.visual[i]) for i in idx]
    T = int(math.ceil(max(lengths) / mult) * mult)
    B = len(idx)
    v = torch.zeros(B, T, data.visual[idx[0]].shape[1])
    a = torch.zeros(B, T, data.audio[idx[0]].shape[1])
    m = torch.zeros(B, T, dtype=torch.bool)
    ev = []
    for b, i in enumerate(idx):
        L = lengths[b]
        v[b, :L] = torch.from_numpy(data.visual[i])  # float16 stores -> float32 here
        a[b, :L] = torch.from_numpy(data.audio[i])
        m[b, :L] = True
        e = data.events[i].copy()
        e[:, 0] = to_steps(e[:, 0], data.t0[i], data.hop, data.window)
        e[:, 1] = to_steps(e[:, 1], data.t0[i], data.hop, data.window)
        ev.append(torch.from_numpy(e).float().to(device))
    return v.to(device), a.to(device), m.to(device), ev, lengths


__all__ = ["DenseData", "load_dense_data", "standardize_dense", "to_steps", "to_seconds", "make_batch"]
