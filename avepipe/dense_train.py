"""Train and evaluate the dense UnAV-100 localization head (REFERENCE §7).

Features come from ragged stores (window/hop steps, `lengths`, `timestamps`); events from
the manifest's UnAV-100 annotations. Model selection on val average mAP (EMA weights);
the test split is evaluated once with the selected weights and written as UnAV/ActivityNet
JSON predictions plus `metrics.json` (`mAP@0.1` ... `mAP@0.9`, `average_mAP`, fractions).

Bad input (documented handling, each reported with the video id): events that end after
the video's features (features shorter than the annotation) are clipped to the covered
time; events wholly past the features are dropped.
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
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if x.ndim > 2 else x


def load_dense_data(manifest: pd.DataFrame, visual_paths: Sequence[Path], audio_paths: Sequence[Path]) -> DenseData:
    from avepipe.store import open_features

    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    n_failed = int((manifest["status"] != "ok").sum())
    ids = ok["video_id"].astype(str).tolist()
    vs = open_features([Path(p) for p in visual_paths], video_ids=ids)
    au = open_features([Path(p) for p in audio_paths], video_ids=ids)
    pv, pa = vs.attrs.get("provenance", {}), au.attrs.get("provenance", {})
    hop = float(pv.get("hop") or pa.get("hop") or 0)
    window = float(pv.get("window") or pa.get("window") or 0)
    if not hop or not window:
        raise ValueError("dense head needs window/hop feature stores (config `windows:`); stores carry none")
    if pa.get("hop") and abs(float(pa["hop"]) - hop) > 1e-9:
        raise ValueError(f"visual hop {hop} != audio hop {pa['hop']}: features are not aligned")
    bad = [v for v, s1, s2 in zip(ids, vs.status, au.status) if s1 != "ok" or s2 != "ok"]
    labels: dict[int, str] = {}
    visual, audio, events, keep, warns, t0 = [], [], [], [], [], []
    for i, vid in enumerate(ids):
        if vid in bad:
            continue
        L = int(min(vs.lengths[i], au.lengths[i]))
        if L < 1:
            warns.append(f"{vid}: no feature steps; excluded")
            continue
        v = _pool(np.asarray(vs.features[i, :L], dtype=np.float32))
        a = np.asarray(au.features[i, :L], dtype=np.float32).reshape(L, -1)
        start = float(np.asarray(vs.timestamps[i])[0]) if vs.timestamps is not None else 0.0
        covered = start + (L - 1) * hop + window
        ev = []
        for e in json.loads(ok.loc[i, "events"]):
            s, t = map(float, e["segment"])
            labels[int(e["label_id"])] = e["label"]
            if s >= covered:
                warns.append(f"{vid}: event {e['label']} [{s:.2f},{t:.2f}] starts after the features end "
                             f"({covered:.2f} s); dropped")
                continue
            if t > covered + 1e-6:
                warns.append(f"{vid}: event {e['label']} [{s:.2f},{t:.2f}] clipped to the features' end {covered:.2f} s")
                t = covered
            ev.append((s, t, int(e["label_id"])))
        visual.append(v)
        audio.append(a)
        events.append(np.asarray(ev, dtype=np.float64).reshape(-1, 3))
        keep.append(i)
        t0.append(start)
    for w in warns:
        log.warning("%s", w)
    n_classes = max(labels) + 1 if labels else 1
    classes = [labels.get(k, f"class_{k}") for k in range(n_classes)]
    sub = ok.loc[keep]
    log.info("dense data: %d videos (%d failed in decode, %d failed in extraction)", len(keep), n_failed, len(bad))
    return DenseData([ids[i] for i in keep], sub["split"].to_numpy(), visual, audio, np.asarray(t0), hop, window,
                     sub["duration"].to_numpy(dtype=float), events, classes,
                     warns + [f"{v}: failed feature extraction; excluded" for v in bad])


# ---------------------------------------------------------------- time <-> step coordinates
def to_steps(t: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    """Seconds -> finest-level coordinates where feature i's centre sits at i + 0.5."""
    return (t - (t0 + window / 2)) / hop + 0.5


def to_seconds(u: np.ndarray, t0: float, hop: float, window: float) -> np.ndarray:
    return (u - 0.5) * hop + t0 + window / 2


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
        v[b, :L] = torch.from_numpy(data.visual[i])
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
                config: dict | None = None, **hparams) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    d = dict(TRAIN_DEFAULTS["full"])
    epochs, batch_size, lr = epochs or d["epochs"], batch_size or d["batch_size"], lr or d["lr"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
    hp = {"levels": 6, **hparams}
    model = DenseLocalizer(data.visual[0].shape[1], data.audio[0].shape[1], len(data.classes), **hp).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    train_idx, sel_idx, test_idx = data.subset("train"), data.subset(select_on), data.subset("test")
    if not train_idx or not test_idx:
        raise ValueError(f"need train and test videos, got {len(train_idx)} / {len(test_idx)}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=d["weight_decay"])
    steps = math.ceil(len(train_idx) / batch_size)
    warm = min(d["warmup_epochs"], max(epochs // 8, 0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(epochs, warm, steps))
    ckpt_path = out_dir / "checkpoint.pt"
    start, best, history = 0, {"score": -1.0, "epoch": 0, "state": None}, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck.get("done"):
            ck = None
        else:
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            torch.set_rng_state(ck["rng"])
            start, best, history = ck["epoch"], ck["best"], ck["history"]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):
        torch.randperm(len(train_idx), generator=gen)
    post = dict(sigma=sigma, max_segments=max_segments, min_score=min_score)
    step = start * steps
    from tqdm import trange

    for epoch in trange(start, epochs, disable=not progress, desc="dense"):
        model.train()
        t0, parts = time.perf_counter(), []
        order = torch.randperm(len(train_idx), generator=gen).tolist()
        for s in range(0, len(order), batch_size):
            idx = [train_idx[j] for j in order[s:s + batch_size]]
            v, a, m, ev, lengths = _batch(data, idx, model.levels, dev)
            loss, p = model.loss(model(v, a, m), ev)
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
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
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
    ema.load_state_dict(best["state"])
    metrics, preds = evaluate(ema, data, test_idx, dev, tious, **post)
    write_predictions(preds, data, out_dir / "predictions.json")
    metrics.update({"selected_epoch": best["epoch"], "select_on": select_on,
                    f"{select_on}_average_mAP": best["score"], "n_test_videos": len(test_idx),
                    "warnings": data.warnings,
                    "per_class_ap": {data.classes[int(k)]: v["average_AP"] for k, v in metrics.pop("per_class").items()}})
    metrics["provenance"] = provenance("heads:dense", config or {}, hparams=hp, seed=seed)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    torch.save({"model": best["state"], "epoch": best["epoch"], "done": True, "classes": data.classes,
                "hparams": hp}, ckpt_path)
    plot_ap(metrics, out_dir / "ap.png")
    return metrics


def write_predictions(preds: pd.DataFrame, data: DenseData, path: Path) -> None:
    """UnAV / ActivityNet result format: {"version", "results": {vid: [{segment, label, label_id, score}]}}."""
    results: dict[str, list] = {v: [] for v in data.video_ids if v in set(preds.video_id)}
    for r in preds.itertuples():
        results[r.video_id].append({"segment": [round(r.t_start, 3), round(r.t_end, 3)],
                                    "label": data.classes[r.label], "label_id": int(r.label),
                                    "score": round(r.score, 6)})
    path.write_text(json.dumps({"version": "unav100", "results": results, "external_data": {}}))


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


def train_dense_from_cli(a) -> int:
    from avepipe.cli import _kv

    manifest = pd.read_parquet(a.manifest)
    data = load_dense_data(manifest, a.visual, a.audio_features)
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
