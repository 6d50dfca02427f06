"""UnAV-100 dense-branch benchmark: training step time, evaluation time, feature-loading memory.

Three measurements on UnAV-sized synthetic data (docs/reference.md §8: test split 2,167 videos,
10-60 s, mean 42 s -> ~131 steps of 0.96-s windows at 0.32-s hop; visual 2048-d, audio
VGGish 128-d; 100 classes; ~2.8 events per video):

  train  seconds per training step (forward + backward + AdamW) of ``DenseLocalizer`` at
         batch 16, and that time divided by the minutes of video features in the batch
  eval   ``metrics.detection_map`` over 2,167 videos x 100 predictions (goal: < 10 s on this
         CPU), plus soft-NMS per video on 5,000 candidates and writing predictions.json
  load   peak RSS of ``training.dense_data.load_dense_data`` on float16 visual + float32 audio stores
         of the whole test split, in a fresh subprocess (so the peak is the loader's alone)

    python benchmarks/unav.py                       # all three, full sizes
    python benchmarks/unav.py --only eval
    python benchmarks/unav.py --only load --videos 500
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOP, WIN = 0.32, 0.96


def _durations(rng, n):
    return rng.uniform(10, 60, n)  # UnAV: 10-60 s, mean ~ 42 s (uniform gives 35; see --mean)


def _n_steps(d):
    return (np.floor((np.asarray(d) - WIN) / HOP + 1e-9) + 1).astype(int)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _test_durations(n, mean, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.uniform(10, 60, n)
    return np.clip(d * mean / d.mean(), 10, 60)  # rescale to the split's mean length


# --------------------------------------------------------------------------- train
def bench_train(args) -> dict:
    import torch

    from avepipe.heads.dense import DenseLocalizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = DenseLocalizer(2048, 128, 100, dim=args.dim, levels=6, avca=args.avca, bece=args.bece)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    times, minutes = [], []
    for it in range(args.steps + 1):
        d = _test_durations(args.batch, args.mean, seed=it)
        L = _n_steps(d)
        T = int(np.ceil(L.max() / 32) * 32)
        v, a = torch.randn(args.batch, T, 2048), torch.randn(args.batch, T, 128)
        m = torch.arange(T)[None] < torch.as_tensor(L)[:, None]
        ev = []
        for n in L:
            k = int(rng.integers(1, 5))
            s = rng.uniform(0, n - 5, k)
            ev.append(torch.tensor(np.stack([s, np.minimum(s + rng.uniform(3, 60, k), n - 1),
                                             rng.integers(0, 100, k)], 1), dtype=torch.float32))
        t0 = time.perf_counter()
        loss, _ = model.loss(model(v, a, m), ev)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
            minutes.append(float(((L - 1) * HOP + WIN).sum() / 60))
    step = float(np.mean(times))
    return {"batch": args.batch, "dim": args.dim, "threads": args.threads, "avca": args.avca, "bece": args.bece,
            "seconds_per_step": step, "video_minutes_per_step": float(np.mean(minutes)),
            "seconds_per_video_minute": float(np.sum(times) / np.sum(minutes)),
            "epoch_estimate_s_6489_train_videos": step * np.ceil(6489 / args.batch)}


# --------------------------------------------------------------------------- eval
def bench_eval(args) -> dict:
    import pandas as pd
    import torch

    from avepipe.training.dense import write_predictions
    from avepipe.training.dense_data import DenseData
    from avepipe.heads.dense import soft_nms
    from avepipe.metrics import detection_map

    rng = np.random.default_rng(0)
    n = args.videos
    dur = _test_durations(n, args.mean)
    ids = [f"v{i:05d}" for i in range(n)]
    gt_rows = []
    for vid, d in zip(ids, dur):
        for _ in range(int(rng.poisson(1.8)) + 1):  # ~2.8 events per video (30,059 / 10,790)
            s = rng.uniform(0, d - 2)
            gt_rows.append((vid, s, min(d, s + rng.uniform(1, 20)), int(rng.integers(100))))
    gt = pd.DataFrame(gt_rows, columns=["video_id", "t_start", "t_end", "label"])
    p_rows = []
    for vid, d in zip(ids, dur):
        s = rng.uniform(0, d - 1, args.preds)
        e = np.minimum(d, s + rng.uniform(0.5, 20, args.preds))
        for a, b, lab, sc in zip(s, e, rng.integers(0, 100, args.preds), rng.uniform(0, 1, args.preds)):
            p_rows.append((vid, a, b, int(lab), sc))
    pred = pd.DataFrame(p_rows, columns=["video_id", "t_start", "t_end", "label", "score"])
    t0 = time.perf_counter()
    m = detection_map(pred, gt, np.round(np.arange(0.1, 1.0, 0.1), 1))
    t_map = time.perf_counter() - t0

    torch.set_num_threads(args.threads)
    c = 5000
    s = torch.as_tensor(rng.uniform(0, 180, c))
    segs = torch.stack([s, s + torch.as_tensor(rng.uniform(1, 60, c))], 1)
    sc, lab = torch.as_tensor(rng.uniform(0.001, 1, c)), torch.as_tensor(rng.integers(0, 100, c))
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        soft_nms(segs, sc, lab, sigma=0.4, max_segments=100, min_score=0.001)
    t_nms = (time.perf_counter() - t0) / reps

    data = DenseData(ids, np.array(["test"] * n), [], [], np.zeros(n), HOP, WIN, dur, [],
                     [f"class_{k}" for k in range(100)])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_predictions(pred, data, Path(tmp) / "predictions.json")
        t_write = time.perf_counter() - t0
    return {"videos": n, "predictions": len(pred), "gt_events": len(gt), "detection_map_s": t_map,
            "average_mAP_random": m["average_mAP"], "soft_nms_per_video_s_5000_candidates": t_nms,
            "soft_nms_test_split_estimate_s": t_nms * n, "write_predictions_s": t_write,
            "goal_detection_map_under_10s": t_map < 10}


# --------------------------------------------------------------------------- load
def _write_stores(root: Path, n: int, mean: float, shards: int) -> dict:
    from avepipe.store import write_feature_shard

    dur = _test_durations(n, mean)
    L = _n_steps(dur)
    ids = [f"v{i:05d}" for i in range(n)]
    rng = np.random.default_rng(0)
    for s in range(shards):
        part = list(range(s, n, shards))
        vis = [rng.standard_normal((L[i], 2048), dtype=np.float32).astype(np.float16) for i in part]
        ts = [np.arange(L[i]) * HOP for i in part]
        write_feature_shard(root / "vis" / f"shard-{s:03d}.zarr", [ids[i] for i in part], vis, timestamps=ts,
                            dtype="float16", provenance={"window": WIN, "hop": HOP})
        del vis
        aud = [rng.standard_normal((L[i], 128), dtype=np.float32) for i in part]
        write_feature_shard(root / "aud" / f"shard-{s:03d}.zarr", [ids[i] for i in part], aud, timestamps=ts,
                            dtype="float32", provenance={"window": WIN, "hop": HOP})
    import pandas as pd

    ev = json.dumps([{"segment": [1.0, 5.0], "label": "man speaking", "label_id": 0}])
    pd.DataFrame({"video_id": ids, "split": "test", "duration": dur, "events": ev, "status": "ok"}).to_parquet(
        root / "manifest.parquet")
    return {"steps_total": int(L.sum()), "steps_mean": float(L.mean()),
            "visual_bytes_f16": int(L.sum()) * 2048 * 2, "audio_bytes_f32": int(L.sum()) * 128 * 4}


def _load_child(root: str) -> None:
    import pandas as pd

    from avepipe.training.dense_data import load_dense_data

    man = pd.read_parquet(Path(root) / "manifest.parquet")
    base = _rss()
    t0 = time.perf_counter()
    data = load_dense_data(man, [Path(root) / "vis"], [Path(root) / "aud"])
    dt = time.perf_counter() - t0
    held = sum(v.nbytes + a.nbytes for v, a in zip(data.visual, data.audio))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": dt, "rss_before": base, "peak_rss": peak, "peak_minus_before": peak - base,
                      "rss_after": _rss(), "arrays_held_bytes": held, "videos": len(data.video_ids)}))


def bench_load(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        info = _write_stores(Path(tmp), args.videos, args.mean, args.shards)
        info["write_s"] = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--_load-child", tmp], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["train", "eval", "load"], action="append")
    p.add_argument("--videos", type=int, default=2167, help="test-split videos (eval, load)")
    p.add_argument("--preds", type=int, default=100, help="predictions per video (eval)")
    p.add_argument("--mean", type=float, default=42.0, help="mean video length in s")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--avca", action="store_true")
    p.add_argument("--bece", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--tmp", default=None, help="where to write the temporary feature stores (load)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--_load-child", dest="load_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.load_child:
        _load_child(a.load_child)
        return 0
    res = {}
    for name, fn in (("train", bench_train), ("eval", bench_eval), ("load", bench_load)):
        if a.only and name not in a.only:
            continue
        res[name] = fn(a)
        print(name, json.dumps(res[name], indent=1, default=float), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
