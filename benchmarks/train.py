"""Training-loop benchmark: epoch time, data-loading share and peak memory per head.

Each head runs in its own subprocess (so peak RSS is that head's alone) on AVE-sized
synthetic features: N training videos of 10 x 7 x 7 x 512 visual + 10 x 128 audio
(float32 by default), trained by ``avepipe.training.ave.train_ave`` for ``--epochs`` epochs.
Printed beside the reference anchors (docs/reference.md §3, 2-core CPU, random features, batch
64, data loading excluded): CACE-Net 168 s/epoch float32 (peak RSS 2.3 GB float32,
3.7 GB float64); Ge et al. 205 s/epoch, 4.4 GB.

    python benchmarks/train.py                          # all heads, 3339 videos (slow)
    python benchmarks/train.py --heads avel --videos 128 --eval-videos 32
    python benchmarks/train.py --heads cace_net event_memory --videos 640 --epochs 2 \
        --precision float32 bf16 --repeat 3             # side by side, interleaved

``--precision``: each head runs once per precision, interleaved with ``--repeat`` rounds; the
table gives each run and then, per head and precision, the median epoch time and the ratio
bf16 / float32 of the medians (measured side by side, so host noise mostly cancels).
Children run with THP_MEM_ALLOC_ENABLE=1 as the `avepipe` command does (set it to 0 to compare).

"x ref" columns: epoch time extrapolated to 3339 videos / the reference's, and peak minus
data / the reference's peak (goal: <= 0.5 at <= 1). On a shared CPU (the printed 1-min load
above the core count) wall times are inflated: compare runs taken side by side.
``--reuse-memory`` trains with ``reuse_freed_memory=True`` (fewer page faults, higher peak).

"peak" is the process's max RSS; "peak-data" subtracts the RSS measured right after
the synthetic features were built, i.e. what training itself adds (the reference
numbers did not hold the dataset in memory).
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

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = {
    "cace_net": "CACE-Net ref: 168 s/epoch f32 (441 s f64), peak 2.3 GB f32 / 3.7 GB f64",
    "event_memory": "Ge et al. ref: 205 s/epoch, peak 4.4 GB",
}
# (epoch seconds, peak GB) of each reference at 3339 videos; goal: time ratio <= 0.5 at peak ratio <= 1
ANCHOR_NUMBERS = {"cace_net": (168.0, 2.3), "event_memory": (205.0, 4.4)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gemm_gflops() -> dict:
    """This machine's current matmul speed (31360x512 @ 512x1536, float32 and bf16), taken
    before and after each child: on a shared host it moves by up to 2x within minutes, and
    epoch times only compare at similar values (quiet 2-core anchors machine: ~225 / ~960)."""
    import torch

    out = {}
    x, w = torch.randn(31360, 512), torch.randn(1536, 512)
    for name, dt in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = x.to(dt), w.to(dt)
        a @ b.T
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b.T
        out[name] = 2 * 31360 * 512 * 1536 * 5 / (time.perf_counter() - t0) / 1e9
    return out


def _synthetic(n_train: int, n_eval: int, dtype: str, seed: int = 0):
    import numpy as np

    from avepipe.training.ave_data import data_from_arrays

    rng = np.random.default_rng(seed)
    n = n_train + 2 * n_eval
    visual = np.empty((n, 10, 7, 7, 512), dtype=dtype)
    for lo in range(0, n, 256):   # chunked: never a float64 copy of the whole array
        hi = min(lo + 256, n)
        visual[lo:hi] = rng.standard_normal((hi - lo, 10, 7, 7, 512), dtype=np.float32)
    audio = rng.standard_normal((n, 10, 128), dtype=np.float32).astype(dtype)
    label = rng.integers(0, 28, n)
    start = rng.integers(0, 8, n)
    end = np.minimum(start + rng.integers(2, 10, n), 10)
    t = np.arange(10)[None]
    cls = np.where((t >= start[:, None]) & (t < end[:, None]), label[:, None], 28)
    seg = np.eye(29, dtype=np.float32)[cls]
    split = np.array(["train"] * n_train + ["val"] * n_eval + ["test"] * n_eval)
    return data_from_arrays(visual, audio, seg, split)


def child(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from avepipe.options import HeadOptions, TrainOptions
    from avepipe.training.ave import train_ave

    load0 = os.getloadavg()[0]
    gemm0 = _gemm_gflops()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    data = _synthetic(args.videos, args.eval_videos, args.dtype)
    build_s = time.perf_counter() - t0
    rss_data = _rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        train_ave(data, tmp, head=args.child, setting=args.setting, seed=0,
                  train=TrainOptions(select_on="last", device=args.device, precision=args.precision[0]),
                  head_opts=HeadOptions(epochs=args.epochs, batch_size=args.batch_size),
                  reuse_freed_memory=args.reuse_memory)
        log = [json.loads(x) for x in Path(tmp, "log.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    last = log[-1]
    return {"head": args.child, "setting": args.setting, "videos": args.videos, "dtype": args.dtype,
            "precision": args.precision[0], "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
            "threads": torch.get_num_threads(), "epoch_s": last["train_s"], "data_s": last["data_s"],
            "data_share": last["data_share"], "eval_s": last["eval_s"], "build_s": build_s,
            "rss_start_gb": rss0 / 1e9, "rss_data_gb": rss_data / 1e9, "peak_gb": peak / 1e9,
            "peak_minus_data_gb": (peak - rss_data + rss0) / 1e9,
            "epoch_s_per_3339": last["train_s"] * 3339 / args.videos,
            "loadavg_1min": [load0, os.getloadavg()[0]],
            "gemm_gflops": {k: [gemm0[k], v] for k, v in _gemm_gflops().items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="*", help="heads to run (default: every importable head)")
    p.add_argument("--videos", type=int, default=3339, help="training videos (AVE: 3339)")
    p.add_argument("--eval-videos", type=int, default=402, help="val and test videos each (AVE: 402)")
    p.add_argument("--epochs", type=int, default=1, help="epochs; the last one is reported")
    p.add_argument("--batch-size", type=int, default=None, help="default: the head's TRAIN_DEFAULTS")
    p.add_argument("--setting", default="full")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="in-memory feature dtype (the store default is float16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the anchors used 2)")
    p.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bf16"],
                   help="training precision(s); several: run side by side")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every head x precision, interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reuse-memory", action="store_true",
                   help="train_ave(reuse_freed_memory=True): fewer page faults, higher peak RSS")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    from avepipe.heads import available

    heads = args.heads or available()
    results = []
    runs = [(h, prec) for _ in range(args.repeat) for h in heads for prec in args.precision]
    for head, prec in runs:
        cmd = [sys.executable, __file__, "--child", head, "--videos", str(args.videos),
               "--eval-videos", str(args.eval_videos), "--epochs", str(args.epochs),
               "--setting", args.setting, "--dtype", args.dtype, "--device", args.device,
               "--precision", prec]
        for flag, val in (("--batch-size", args.batch_size), ("--threads", args.threads)):
            if val:
                cmd += [flag, str(val)]
        if args.reuse_memory:
            cmd.append("--reuse-memory")
        env = {"THP_MEM_ALLOC_ENABLE": "1", **os.environ,
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{head}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({"head": head, "precision": prec, "error": proc.stderr[-2000:]})
            continue
        results.append(json.loads(line[-1][len("RESULT "):]))

    extrap = args.videos != 3339
    print(f"\n{args.videos} training videos, {args.eval_videos} val/test each, {args.dtype}, "
          f"setting {args.setting}, device {args.device}, {args.threads} threads, "
          f"reuse_freed_memory={args.reuse_memory}")
    if extrap:
        print(f"s/3339 and x ref are EXTRAPOLATED linearly from {args.videos} to 3339 training videos")
    hdr = (f"{'head':<14}{'prec':>9}{'epoch s':>9}{'s/3339':>9}{'x ref':>7}{'data %':>8}{'eval s':>8}{'peak GB':>9}"
           f"{'-data GB':>9}{'x ref':>7}{'load':>11}{'GEMM f32/bf16':>15}  reference")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['head']:<14}  failed")
            continue
        ref_s, ref_gb = ANCHOR_NUMBERS.get(r["head"], (None, None))
        # the reference figures exclude the dataset, so the peak ratio uses peak minus data
        r["time_ratio_to_ref"] = r["epoch_s_per_3339"] / ref_s if ref_s else None
        r["peak_ratio_to_ref"] = r["peak_minus_data_gb"] / ref_gb if ref_gb else None
        tr = f"{r['time_ratio_to_ref']:>7.2f}" if ref_s else f"{'-':>7}"
        pr = f"{r['peak_ratio_to_ref']:>7.2f}" if ref_gb else f"{'-':>7}"
        load = "{:.1f}->{:.1f}".format(*r["loadavg_1min"])
        gemm = "{:.0f}/{:.0f}".format(*(sum(r["gemm_gflops"][k]) / 2 for k in ("float32", "bf16")))
        print(f"{r['head']:<14}{r['precision']:>9}{r['epoch_s']:>9.2f}{r['epoch_s_per_3339']:>9.1f}{tr}{100 * r['data_share']:>8.2f}"
              f"{r['eval_s']:>8.2f}{r['peak_gb']:>9.2f}{r['peak_minus_data_gb']:>9.2f}{pr}{load:>11}{gemm:>15}  "
              f"{ANCHORS.get(r['head'], '')}")
    print("x ref: epoch time (s/3339) / the reference's, and peak minus data / the reference's peak "
          "(goal <= 0.5 and <= 1). load: 1-min load average at start -> end of the child; "
          f"above {os.cpu_count()} the CPU was shared and times are inflated. GEMM: matmul GFLOP/s "
          "measured in the child (mean of before/after; quiet anchor machine ~225/~960).")
    ok = [r for r in results if "error" not in r]
    if args.repeat > 1 or len(args.precision) > 1:
        import statistics

        print(f"\nmedians over {args.repeat} interleaved round(s):")
        for head in heads:
            med = {}
            for prec in args.precision:
                rs = [r for r in ok if r["head"] == head and r["precision"] == prec]
                if rs:
                    med[prec] = (statistics.median(r["epoch_s_per_3339"] for r in rs),
                                 max(r["peak_minus_data_gb"] for r in rs))
            for prec, (sec, gb) in med.items():
                ref_s, ref_gb = ANCHOR_NUMBERS.get(head, (None, None))
                vs = f"  x ref {sec / ref_s:.2f} time, {gb / ref_gb:.2f} peak" if ref_s else ""
                print(f"  {head:<14}{prec:>9}  {sec:8.1f} s/3339  peak-data {gb:5.2f} GB{vs}")
            if "float32" in med and "bf16" in med:
                print(f"  {head:<14}  bf16 / float32 epoch time (side by side): "
                      f"{med['bf16'][0] / med['float32'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
