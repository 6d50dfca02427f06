"""Train and evaluate the dense UnAV-100 localization head (docs/reference.md §8).

``train_dense`` trains ``DenseLocalizer`` on the train split with the head's recipe
(``TRAIN_DEFAULTS`` in avepipe/heads/dense.py: AdamW, per-step linear warm-up then cosine,
gradient clipping, EMA of the weights), selects the EMA weights on ``train.select_on``
(average mAP every ``evaluate.eval_every`` epochs and at the last), and evaluates the test split once.
Outputs in ``out_dir``: ``checkpoint.pt`` (resume), ``log.jsonl`` (1-based ``epoch``),
``best.pt`` (the selected EMA weights, classes, hparams), ``metrics.json`` (``mAP@0.1`` ...
``mAP@0.9``, ``average_mAP``, fractions), ``predictions.json`` (UnAV/ActivityNet result
format), ``per_class_ap.csv`` (AP per class at every tIoU), ``ap.png`` (mAP vs tIoU,
per-class AP), ``pr_curve.png`` (precision / recall at tIoU 0.5, pooled and per class) and
``learning_curve.png``. Data loading: avepipe.training.dense_data; run plumbing:
avepipe.training.harness.

The command-line entry (the CLI's ``avepipe train`` for the dense head)::

    run(manifest, visual, audio, out_dir, *, head, setting, seed, train, head_opts, evaluate,
        features_name="", config=None)

opens the manifest (parquet) and the window/hop feature stores, then calls ``train_dense``.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from avepipe import heads as H
from avepipe.devices import resolve_device
from avepipe.heads.dense import soft_nms
from avepipe.metrics import detection_map, precision_recall
from avepipe.options import SELECT_ON, EvaluateOptions, HeadOptions, TrainOptions
from avepipe.progress import Progress
from avepipe.training import harness as R
from avepipe.training.dense_data import DenseData, load_dense_data, make_batch, standardize_dense, to_seconds
from avepipe.training.schedule import make_optimizer, schedule, set_lr

log = logging.getLogger(__name__)

SETTINGS = ("full",)  # what this loop implements (events with segment boundaries)


def run(manifest: str | Path, visual: Sequence[str | Path], audio: Sequence[str | Path], out_dir: str | Path, *,
        head: str, setting: str, seed: int, train: TrainOptions, head_opts: HeadOptions, evaluate: EvaluateOptions,
        features_name: str = "", config: dict | None = None) -> dict:
    """Read the manifest and the window/hop feature stores, train, evaluate; ``features_name``
    (the feature pair) is recorded in provenance."""
    data = load_dense_data(pd.read_parquet(manifest), [Path(p) for p in visual], [Path(p) for p in audio])
    return train_dense(data, out_dir, head=head, setting=setting, seed=seed, train=train, head_opts=head_opts,
                       evaluate=evaluate, config={"features_name": features_name, **(config or {})})


def train_dense(data: DenseData, out_dir: str | Path, *, head: str = "dense", setting: str, seed: int,
                train: TrainOptions, head_opts: HeadOptions, evaluate: EvaluateOptions, config: dict | None = None,
                resume: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
                eval_every: int | None = None) -> dict:
    """Train, select and evaluate; returns the metrics dict (also metrics.json).

    ``head_opts.epochs`` counts the cosine epochs; warm-up epochs (``min(warmup_epochs,
    epochs // 8)``) come on top, as the baseline's "40 epochs + 5 warm-up". ``hparams`` go to
    the ``DenseLocalizer`` constructor. ``train.normalize`` "standardize" z-scores ``data`` in
    place. ``on_epoch_end(epoch, record)``: called after the epoch's checkpoint is written.
    """
    eval_every = int(eval_every or evaluate.eval_every)
    if setting not in SETTINGS:
        raise ValueError(f"the dense trainer implements the settings {SETTINGS}, not {setting!r}")
    if H.entry(head).trainer != "dense":
        raise ValueError(f"head {head!r} is trained by the {H.entry(head).trainer} trainer, not the dense one")
    if train.precision != "float32":
        raise ValueError(f"precision {train.precision!r}: the dense UnAV-100 head trains in float32 "
                         "(set train.precision: float32 for this run)")
    if train.select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {train.select_on!r}")
    recipe = H.train_defaults(head, setting)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(head_opts, key) is not None:
            recipe[key] = getattr(head_opts, key)
    hp = {"levels": 6, **head_opts.hparams}
    H.check_hparams(head, hp)
    epochs, bs = int(recipe["epochs"]), int(recipe["batch_size"])
    warm = min(int(recipe["warmup_epochs"]), epochs // 8)
    total = epochs + warm
    dev = resolve_device(train.device)
    metric_split = "val" if train.select_on == "last" else train.select_on
    train_idx, sel_idx, test_idx = data.subset("train"), data.subset(metric_split), data.subset("test")
    if not train_idx or not test_idx:
        raise ValueError(f"need train and test videos, got {len(train_idx)} / {len(test_idx)}")
    if not sel_idx:
        log.warning("no %s videos: model selection falls back to the train split", metric_split)
    if train.normalize == "standardize" and "standardize" not in data.provenance:
        standardize_dense(data)
    post = dict(sigma=evaluate.soft_nms_sigma, max_segments=evaluate.max_segments, min_score=evaluate.min_score)
    tious = list(evaluate.tious)
    steps = math.ceil(len(train_idx) / bs)
    stage = "heads:dense"
    run_config = {"stage": stage, "code": _fingerprint(stage), "head": head, "setting": setting, "seed": int(seed),
                  "select_on": train.select_on, "normalize": train.normalize, "device": dev.type,
                  "train": {**recipe, "warmup_epochs_used": warm, "eval_every": int(eval_every)}, "hparams": hp,
                  "evaluate": {"tious": tious, **post},
                  "data": {**data.summary(), "ids_sha256": R.ids_sha256(f"{s}:{v}" for s, v in zip(data.split, data.video_ids)),
                           "features_sha256": R.json_sha256(data.provenance)}}

    with R.deterministic(dev):
        gen = R.seed_all(seed)
        model = H.head_class(head)(data.visual[0].shape[1], data.audio[0].shape[1], len(data.classes), **hp).to(dev)
        ema = copy.deepcopy(model).requires_grad_(False)
        # unfused AdamW: the published dense numbers were made with it (fused differs in rounding)
        opt = make_optimizer(model.parameters(), recipe, fused=False)
        sched = schedule(recipe, epochs=total, steps_per_epoch=steps, warmup_epochs=warm)
        rd = R.Run(out_dir, run_config)
        best = {"score": -math.inf, "epoch": 0, "state": None}
        ck = rd.resume(resume)
        if ck is not None:
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
            R.set_rng_state(ck["rng"], gen)
            best = ck["best"]
        with Progress(total, initial=rd.epoch, desc=f"{head}/{setting}", unit="epoch") as bar:
            for epoch in range(rd.epoch + 1, total + 1):
                model.train()
                t0, parts = time.perf_counter(), []
                order = torch.randperm(len(train_idx), generator=gen).tolist()
                for j, s in enumerate(range(0, len(order), bs)):
                    step = (epoch - 1) * steps + j  # 0-based global step
                    lr = set_lr(opt, sched.factor(step))
                    idx = [train_idx[i] for i in order[s:s + bs]]
                    v, a, m, ev, _ = make_batch(data, idx, model.levels, dev)
                    loss, p = model.loss(model(v, a, m), ev)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {p} at epoch {epoch} on videos "
                                                 f"{[data.video_ids[i] for i in idx]}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_grad_norm"])
                    opt.step()
                    # EMA of the weights (the UnAV baseline evaluates the EMA model); the decay ramps
                    # up with the step count so short runs are not stuck near the initial weights
                    decay = min(recipe["ema"], (2 + step) / (11 + step))
                    with torch.no_grad():
                        for pe, pm in zip(ema.parameters(), model.parameters()):
                            pe.lerp_(pm, 1 - decay)
                        for be, bm in zip(ema.buffers(), model.buffers()):
                            be.copy_(bm)
                    parts.append({"loss": float(loss.detach()), **p})
                rec = {"epoch": epoch, "lr": lr, "seconds": time.perf_counter() - t0,
                       **{k: float(np.mean([x[k] for x in parts])) for k in parts[0]}}
                if epoch % eval_every == 0 or epoch == total:
                    m_sel, _ = evaluate_map(ema, data, sel_idx or train_idx, dev, tious,
                                            gt=data.gt.get(metric_split) if sel_idx else None, **post)
                    rec[f"{metric_split}_average_mAP"] = m_sel["average_mAP"]
                    if m_sel["average_mAP"] > best["score"] or (train.select_on == "last" and epoch == total):
                        best = {"score": m_sel["average_mAP"], "epoch": epoch, "state": R.cpu_state(ema)}
                rd.end_epoch(rec, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                   "rng": R.rng_state(gen), "best": best})
                bar.update(loss=f"{rec['loss']:.4f}", best=best["epoch"])
                if on_epoch_end is not None:
                    on_epoch_end(epoch, rec)

        ema.load_state_dict(best["state"])
        t_eval = time.perf_counter()
        test_gt = data.gt.get("test")
        metrics, preds = evaluate_map(ema, data, test_idx, dev, tious, gt=test_gt, **post)
    out = Path(out_dir)
    gt = test_gt.events if test_gt is not None else ground_truth(data, test_idx)
    write_predictions(preds, data, out / "predictions.json", test_idx)
    per_class = metrics.pop("per_class")
    write_per_class_table(per_class, gt, data.classes, out / "per_class_ap.csv")
    if test_gt is not None:  # annotated test videos that failed count as all missed: say how many
        metrics.update(test_gt.report())
    metrics.update({"selected_epoch": best["epoch"], "select_on": train.select_on if sel_idx else "train",
                    f"{metric_split}_average_mAP": best["score"], "n_test_videos": len(test_idx),
                    "n_test_events": len(gt), "epochs": total, "warmup_epochs": warm,
                    "test_eval_seconds": time.perf_counter() - t_eval,
                    "post_processing": {"soft_nms_sigma": post["sigma"], "max_segments": post["max_segments"],
                                        "min_score": post["min_score"], "pre_nms_topk": 2000},
                    "warnings": data.warnings,
                    "per_class_ap": {data.classes[int(k)]: v["average_AP"] for k, v in per_class.items()}})
    from avepipe.provenance import provenance

    metrics["provenance"] = provenance(stage, config or {}, hparams=hp, seed=seed, features=data.provenance)
    R.write_json(metrics, out / "metrics.json")
    R.atomic_save({"model": best["state"], "epoch": best["epoch"], "classes": list(data.classes), "hparams": hp,
                   "config": rd.config}, out / "best.pt")
    plot_ap(metrics, out / "ap.png")
    plot_pr(precision_recall(preds, gt, 0.5), data.classes, out / "pr_curve.png")
    R.try_plot(history=rd.history, path=out / "learning_curve.png", title=f"{head} / {setting} / seed {seed}",
               metrics=(f"{metric_split}_average_mAP",), metric_label="average mAP", selected_epoch=best["epoch"],
               select_on=train.select_on)
    return metrics


def _fingerprint(stage: str) -> str:
    from avepipe.provenance import code_fingerprint

    return code_fingerprint(stage)


# --------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(model, data: DenseData, idx: Sequence[int], device, batch_size=16,
            sigma=0.4, max_segments=100, min_score=0.001) -> pd.DataFrame:
    """Detections (video_id, t_start, t_end, label, score) of ``model`` on videos ``idx``,
    after soft-NMS, in seconds clipped to each video."""
    model.eval()
    rows = []
    position = {i: k for k, i in enumerate(idx)}
    idx = sorted(idx, key=lambda i: len(data.visual[i]))  # similar lengths batch with less padding
    for s in range(0, len(idx), batch_size):
        chunk = list(idx[s:s + batch_size])
        v, a, m, _, lengths = make_batch(data, chunk, model.levels, device)
        out = model(v, a, m)
        for b, i in enumerate(chunk):
            segs, labels, scores = model.decode(out, b, min_score=min_score)
            segs, scores, labels = soft_nms(segs, scores, labels, sigma=sigma, max_segments=max_segments,
                                            min_score=min_score)
            sec = to_seconds(segs.cpu().numpy(), data.t0[i], data.hop, data.window)
            sec = np.clip(sec, 0, data.duration[i])
            for (t_s, t_e), lab, sc in zip(sec, labels.tolist(), scores.tolist()):
                if t_e > t_s:
                    rows.append((position[i], data.video_ids[i], float(t_s), float(t_e), int(lab), float(sc)))
    # videos back in annotation order, each in its post-NMS order: the reference ranks tied
    # scores by position (metrics.reference_rank), so the order is part of the result
    rows.sort(key=lambda r: r[0])
    return pd.DataFrame([r[1:] for r in rows], columns=["video_id", "t_start", "t_end", "label", "score"])


def ground_truth(data: DenseData, idx: Sequence[int]) -> pd.DataFrame:
    rows = [(data.video_ids[i], float(s), float(e), int(k)) for i in idx for s, e, k in data.events[i]]
    return pd.DataFrame(rows, columns=["video_id", "t_start", "t_end", "label"])


def evaluate_map(model, data, idx, device, tious, gt=None, **post) -> tuple[dict, pd.DataFrame]:
    """(``metrics.detection_map`` of the model's detections on ``idx``, the detections). ``gt``:
    a ``metrics.GroundTruth`` from the annotations (default: the events of ``idx`` as loaded)."""
    preds = predict(model, data, idx, device, **post)
    return detection_map(preds, gt.events if gt is not None else ground_truth(data, idx), tious), preds


# --------------------------------------------------------------------------- outputs
def write_predictions(preds: pd.DataFrame, data: DenseData, path: Path, idx: Sequence[int] | None = None) -> None:
    """UnAV / ActivityNet result format: {"version", "results": {vid: [{segment, label, label_id, score}]},
    "external_data"}; every evaluated video (``idx``, default all) has an entry, best first."""
    import json

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
    """mAP against tIoU, and the per-class average AP."""
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


__all__ = ["run", "train_dense", "predict", "ground_truth", "evaluate_map", "write_predictions",
           "write_per_class_table", "plot_pr", "plot_ap", "SETTINGS"]
