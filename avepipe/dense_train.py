"""Train and evaluate the dense UnAV-100 localization head (REFERENCE §7).

Features come from ragged stores (window/hop steps, `lengths`, `timestamps`); events from
the manifest's UnAV-100 annotations. Model selection on val average mAP (EMA weights);
the test split is evaluated once with the selected weights and written as UnAV/ActivityNet
JSON predictions plus `metrics.json` (`mAP@0.1` ... `mAP@0.9`, `average_mAP`, fractions).

Bad input (documented handling, each reported with the video id in a logged warning and
in ``metrics.json["warnings"]``):
  * events that end after the video's features (features shorter than the annotation,
    e.g. extraction keeps whole seconds) are clipped to the time the features cover;
  * events wholly past the features are dropped;
  * events outside [0, duration] are clipped to it; events of zero or negative length and
    events with an unknown label id are dropped;
  * videos failed in decode (manifest ``status``) or in extraction (store ``status``), or
    with no feature step, are excluded and counted.

Outputs in ``out_dir``: ``checkpoint.pt``, ``log.jsonl``, ``metrics.json``,
``predictions.json`` (UnAV/ActivityNet result format), ``per_class_ap.csv`` (AP per class
at every tIoU), ``ap.png`` (mAP vs tIoU, per-class AP) and ``pr_curve.png`` (precision /
recall at tIoU 0.5, pooled over classes and per class).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from avepipe.devices import resolve_device
from avepipe.heads.dense import TRAIN_DEFAULTS, DenseLocalizer, soft_nms
from avepipe.metrics import detection_map
from avepipe.provenance import provenance

log = logging.getLogger(__name__)


@dataclass
class DenseData:
    video_ids: list[str]
    split: np.ndarray
    visual: list[np.ndarray]  # per video (T_i, Cv) float32
    audio: list[np.ndarray]  # per video (T_i, Ca)
    t0: np.ndarray  # first window start (s)
    hop: float
    window: float
    duration: np.ndarray
    events: list[np.ndarray]  # per video (E,3): start s, end s, label id
    classes: list[str]
    warnings: list[str] = field(default_factory=list)

    def subset(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == split]


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
    return DenseData([ids[i] for i in use], sub["split"].astype(str).to_numpy(), visual, audio, np.asarray(t0),
                     hop, window, sub["duration"].to_numpy(dtype=float), events, classes, warns)


# ---------------------------------------------------------------- time <-> step coordinates
def to_steps(t: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    """Seconds -> finest-level coordinates where feature i (its window's centre) sits at i
    (the baseline: (t * fps - num_frames / 2) / feat_stride)."""
    return (t - (t0 + window / 2)) / hop


def to_seconds(u: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    """Inverse of ``to_steps`` (the baseline: (u * feat_stride + num_frames / 2) / fps)."""
    return u * hop + t0 + window / 2


def _batch(data: DenseData, idx: Sequence[int], levels: int, device):
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


@torch.no_grad()
def predict(model: DenseLocalizer, data: DenseData, idx: Sequence[int], device, batch_size=16,
            sigma=0.4, max_segments=100, min_score=0.001) -> pd.DataFrame:
    model.eval()
    rows = []
    idx = sorted(idx, key=lambda i: len(data.visual[i]))  # similar lengths batch with less padding
    for s in range(0, len(idx), batch_size):
        chunk = list(idx[s:s + batch_size])
        v, a, m, _, lengths = _batch(data, chunk, model.levels, device)
        out = model(v, a, m)
        for b, i in enumerate(chunk):
            segs, labels, scores = model.decode(out, b, min_score=min_score)
            segs, scores, labels = soft_nms(segs, scores, labels, sigma=sigma, max_segments=max_segments,
                                            min_score=min_score)
            sec = to_seconds(segs.cpu().numpy(), data.t0[i], data.hop, data.window)
            sec = np.clip(sec, 0, data.duration[i])
            for (t_s, t_e), lab, sc in zip(sec, labels.tolist(), scores.tolist()):
                if t_e > t_s:
                    rows.append((data.video_ids[i], float(t_s), float(t_e), int(lab), float(sc)))
    return pd.DataFrame(rows, columns=["video_id", "t_start", "t_end", "label", "score"])


def ground_truth(data: DenseData, idx: Sequence[int]) -> pd.DataFrame:
    rows = [(data.video_ids[i], float(s), float(e), int(k)) for i in idx for s, e, k in data.events[i]]
    return pd.DataFrame(rows, columns=["video_id", "t_start", "t_end", "label"])


def evaluate(model, data, idx, device, tious, **post) -> tuple[dict, pd.DataFrame]:
    preds = predict(model, data, idx, device, **post)
    return detection_map(preds, ground_truth(data, idx), tious), preds


def _lr_lambda(epochs: int, warmup: int, steps_per_epoch: int):
    total, warm = max(1, epochs * steps_per_epoch), warmup * steps_per_epoch

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


def train_dense(data: DenseData, out_dir: Path, *, seed=0, epochs=None, batch_size=None, lr=None,
                select_on="val", device="auto", tious=tuple(np.round(np.arange(0.1, 1.0, 0.1), 1)),
                eval_every=5, progress=True, sigma=0.4, max_segments=100, min_score=0.001,
                config: dict | None = None, stop_after_epoch: int | None = None, **hparams) -> dict:
    """Train ``DenseLocalizer`` on the train split, select on ``select_on`` (average mAP of
    the EMA weights every ``eval_every`` epochs), evaluate the test split once.

    ``epochs`` counts the cosine epochs; warm-up epochs (``min(5, epochs // 8)``) come on
    top, as the baseline's "40 epochs + 5 warm-up". A ``checkpoint.pt`` of an unfinished
    run is resumed (weights, EMA, optimiser, schedule, RNG, best-so-far).
    ``stop_after_epoch``: leave after that epoch with the checkpoint written (budgeted or
    preempted runs; returns ``{"stopped_at": epoch}``). Returns the metrics dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    d = dict(TRAIN_DEFAULTS["full"])
    epochs, batch_size, lr = epochs or d["epochs"], batch_size or d["batch_size"], lr or d["lr"]
    warm = min(d["warmup_epochs"], epochs // 8)
    total = epochs + warm
    torch.manual_seed(seed)
    np.random.seed(seed)
    # no torch.use_deterministic_algorithms: it is process-global and imports torch._inductor
    # (~10 s); the CPU kernels used here are deterministic (tests/test_dense_train.py checks it)
    hp = {"levels": 6, **hparams}
    model = DenseLocalizer(data.visual[0].shape[1], data.audio[0].shape[1], len(data.classes), **hp).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    train_idx, sel_idx, test_idx = data.subset("train"), data.subset(select_on), data.subset("test")
    if not train_idx or not test_idx:
        raise ValueError(f"need train and test videos, got {len(train_idx)} / {len(test_idx)}")
    if not sel_idx:
        log.warning("no %s videos: model selection falls back to the train split", select_on)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=d["weight_decay"])
    steps = math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warm, steps))
    ckpt_path = out_dir / "checkpoint.pt"
    start, best, history = 0, {"score": -1.0, "epoch": 0, "state": None}, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if not ck.get("done"):
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            torch.set_rng_state(ck["rng"])
            start, best, history = ck["epoch"], ck["best"], ck["history"]
            log.info("resuming %s at epoch %d", ckpt_path, start)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):  # replay the shuffles of the epochs already done
        torch.randperm(len(train_idx), generator=gen)
    post = dict(sigma=sigma, max_segments=max_segments, min_score=min_score)
    step = start * steps
    from tqdm import trange

    for epoch in trange(start, total, disable=not progress, desc="dense"):
        model.train()
        t0, parts = time.perf_counter(), []
        order = torch.randperm(len(train_idx), generator=gen).tolist()
        for s in range(0, len(order), batch_size):
            idx = [train_idx[j] for j in order[s:s + batch_size]]
            v, a, m, ev, lengths = _batch(data, idx, model.levels, dev)
            loss, p = model.loss(model(v, a, m), ev)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {p} at epoch {epoch + 1} on videos "
                                         f"{[data.video_ids[i] for i in idx]}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), d["clip_grad_norm"])
            opt.step()
            sched.step()
            step += 1
            # EMA of the weights (the UnAV baseline evaluates the EMA model); the decay ramps
            # up with the step count so short runs are not stuck near the initial weights
            decay = min(d["ema"], (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            parts.append({"loss": float(loss.detach()), **p})
        rec = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               **{k: float(np.mean([x[k] for x in parts])) for k in parts[0]}}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == total:
            m_sel, _ = evaluate(ema, data, sel_idx or train_idx, dev, tious, **post)
            rec[f"{select_on}_average_mAP"] = m_sel["average_mAP"]
            if m_sel["average_mAP"] > best["score"]:
                best = {"score": m_sel["average_mAP"], "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}}
        history.append(rec)
        with open(out_dir / "log.jsonl", "a" if epoch else "w") as f:
            f.write(json.dumps(rec) + "\n")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                    "best": best, "history": history}, ckpt_path)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < total:
            return {"stopped_at": epoch + 1}
    ema.load_state_dict(best["state"])
    t_eval = time.perf_counter()
    metrics, preds = evaluate(ema, data, test_idx, dev, tious, **post)
    gt = ground_truth(data, test_idx)
    write_predictions(preds, data, out_dir / "predictions.json", test_idx)
    per_class = metrics.pop("per_class")
    write_per_class_table(per_class, gt, data.classes, out_dir / "per_class_ap.csv")
    metrics.update({"selected_epoch": best["epoch"], "select_on": select_on if sel_idx else "train",
                    f"{select_on}_average_mAP": best["score"], "n_test_videos": len(test_idx),
                    "n_test_events": len(gt), "epochs": total, "warmup_epochs": warm,
                    "test_eval_seconds": time.perf_counter() - t_eval,
                    "post_processing": {"soft_nms_sigma": sigma, "max_segments": max_segments,
                                        "min_score": min_score, "pre_nms_topk": 2000},
                    "warnings": data.warnings,
                    "per_class_ap": {data.classes[int(k)]: v["average_AP"] for k, v in per_class.items()}})
    metrics["provenance"] = provenance("heads:dense", config or {}, hparams=hp, seed=seed)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    torch.save({"model": best["state"], "epoch": best["epoch"], "done": True, "classes": data.classes,
                "hparams": hp}, ckpt_path)
    plot_ap(metrics, out_dir / "ap.png")
    plot_pr(pr_curves(preds, gt, 0.5), data.classes, out_dir / "pr_curve.png")
    return metrics


def write_predictions(preds: pd.DataFrame, data: DenseData, path: Path, idx: Sequence[int] | None = None) -> None:
    """UnAV / ActivityNet result format: {"version", "results": {vid: [{segment, label, label_id, score}]},
    "external_data"}; every evaluated video (``idx``, default all) has an entry, best first."""
    vids = [data.video_ids[i] for i in (idx if idx is not None else range(len(data.video_ids)))]
    results: dict[str, list] = {v: [] for v in vids}
    p = preds.sort_values("score", ascending=False, kind="stable")
    names = list(data.classes)
    cols = (p.video_id.astype(str).tolist(), np.round(p.t_start.to_numpy(float), 3).tolist(),
            np.round(p.t_end.to_numpy(float), 3).tolist(), p.label.to_numpy(np.int64).tolist(),
            np.round(p.score.to_numpy(float), 6).tolist())
    for vid, s, e, lab, sc in zip(*cols):
        results.setdefault(vid, []).append({"segment": [s, e], "label": names[lab], "label_id": lab, "score": sc})
    path.write_text(json.dumps({"version": "unav100", "results": results, "external_data": {}}))


def write_per_class_table(per_class: dict, gt: pd.DataFrame, classes: Sequence[str], path: Path) -> pd.DataFrame:
    """``per_class_ap.csv``: one row per class with ground truth (label_id, class, n_gt,
    AP@0.1 ... AP@0.9, average_AP), fractions; best class first."""
    n_gt = gt["label"].value_counts()
    rows = [{"label_id": int(k), "class": classes[int(k)], "n_gt": int(n_gt.get(k, 0)), **v}
            for k, v in per_class.items()]
    df = pd.DataFrame(rows).sort_values(["average_AP", "label_id"], ascending=[False, True])
    df.to_csv(path, index=False, float_format="%.6f")
    return df


def pr_curves(predictions: pd.DataFrame, ground_truth: pd.DataFrame, tiou: float = 0.5) -> dict:
    """Precision/recall curves at one tIoU, matched exactly as ``metrics.detection_map``
    (it reuses its matcher ``metrics._match``; metrics.py has no public curve helper).

    Returns {"per_class": {label: {"precision", "recall" (arrays over that class's ranked
    detections), "n_gt"}}, "pooled": {...}}: "pooled" ranks every detection of every
    class together by score, recall over all ground truth (a micro-averaged curve).
    """
    from avepipe.metrics import _match

    gv, pv = ground_truth["video_id"].astype(str).to_numpy(), predictions["video_id"].astype(str).to_numpy()
    gl, pl = ground_truth["label"].to_numpy(np.int64), predictions["label"].to_numpy(np.int64)
    vid_codes, _ = pd.factorize(np.concatenate([gv, pv]))
    n_vid = int(vid_codes.max()) + 1 if len(vid_codes) else 1
    g_key = gl * n_vid + vid_codes[: len(gv)]
    p_key = pl * n_vid + vid_codes[len(gv):]
    g_ord = np.argsort(g_key, kind="stable")
    gs = ground_truth["t_start"].to_numpy(np.float64)[g_ord]
    ge = ground_truth["t_end"].to_numpy(np.float64)[g_ord]
    grp_keys, grp_start, grp_len = np.unique(g_key[g_ord], return_index=True, return_counts=True)
    score = predictions["score"].to_numpy(np.float64)
    ps, pe = predictions["t_start"].to_numpy(np.float64), predictions["t_end"].to_numpy(np.float64)
    tp = np.zeros(len(score), dtype=bool)
    if len(grp_keys) and len(score):
        pos = np.minimum(np.searchsorted(grp_keys, p_key), len(grp_keys) - 1)
        m = np.flatnonzero(grp_keys[pos] == p_key)
        if len(m):
            p_ord = np.lexsort((np.arange(len(m)), -score[m], p_key[m]))
            sk = p_key[m][p_ord]
            rank = np.empty(len(m), dtype=np.int64)
            rank[p_ord] = np.arange(len(m)) - np.searchsorted(sk, sk, side="left")
            tp[m] = _match(pos[m], rank, ps[m], pe[m], grp_start, grp_len, gs, ge, [tiou])[0]

    def curve(sel: np.ndarray, n_gt: int) -> dict:
        o = sel[np.lexsort((sel, -score[sel]))]  # by score, ties in input order
        ctp = np.cumsum(tp[o])
        k = np.arange(1, len(o) + 1)
        return {"precision": ctp / np.maximum(k, 1), "recall": ctp / max(n_gt, 1), "n_gt": int(n_gt)}

    n_gt = pd.Series(gl).value_counts()
    per = {int(c): curve(np.flatnonzero(pl == c), int(n_gt[c])) for c in sorted(n_gt.index)}
    return {"tiou": tiou, "per_class": per, "pooled": curve(np.arange(len(score)), len(gl))}


def plot_pr(curves: dict, classes: Sequence[str], path: Path) -> None:
    """Pooled precision-recall curve (bold) over the per-class curves (thin) at one tIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for c, cv in curves["per_class"].items():
        if len(cv["recall"]):
            ax.plot(cv["recall"], cv["precision"], lw=0.7, alpha=0.5,
                    label=classes[c] if len(curves["per_class"]) <= 10 else None)
    pool = curves["pooled"]
    ax.plot(pool["recall"], pool["precision"], color="k", lw=2, label="all classes (pooled)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall at tIoU {curves['tiou']:g}")
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ap(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metrics if k.startswith("mAP@")]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([float(k[4:]) for k in keys], [metrics[k] for k in keys], marker="o")
    ax[0].set_xlabel("tIoU")
    ax[0].set_ylabel("mAP")
    ax[0].set_ylim(0, 1)
    ax[0].set_title(f"average mAP {metrics['average_mAP']:.3f}")
    pc = metrics["per_class_ap"]
    ax[1].bar(range(len(pc)), list(pc.values()))
    ax[1].set_xticks(range(len(pc)), list(pc), rotation=90, fontsize=6)
    ax[1].set_title("per-class average AP")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def standardize_dense(data: DenseData) -> None:
    """Per-channel z-scoring with train-split statistics, in place (see train.standardize)."""
    train = data.subset("train")
    for name in ("visual", "audio"):
        seqs = getattr(data, name)
        cat = np.concatenate([seqs[i].astype(np.float64) for i in train])
        mean, std = cat.mean(0), np.maximum(cat.std(0), 1e-6 * cat.std() + 1e-12)
        setattr(data, name, [((x - mean) / std).astype(x.dtype) for x in seqs])


def train_dense_from_cli(a) -> int:
    from avepipe.cli import _kv

    if getattr(a, "precision", "float32") != "float32":
        raise SystemExit(f"avepipe train: --precision {a.precision} is for the AVE heads; the dense "
                         "UnAV-100 head trains in float32 (set train.precision: float32 for this run)")
    manifest = pd.read_parquet(a.manifest)
    data = load_dense_data(manifest, a.visual, a.audio_features)
    if getattr(a, "normalize", "none") == "standardize":
        standardize_dense(data)
    ev = _kv(a.eval)
    post = {k: ev[k] for k in ("max_segments", "min_score") if k in ev}
    if "soft_nms_sigma" in ev:
        post["sigma"] = ev["soft_nms_sigma"]
    if "tious" in ev:
        post["tious"] = tuple(ev["tious"])
    train_dense(data, Path(a.out_dir), seed=a.seed, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                select_on=a.select_on, device=a.device, progress=not a.no_progress,
                config={k: v for k, v in vars(a).items() if k != "fn"}, **post, **_kv(a.hparam))
    return 0
