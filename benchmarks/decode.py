"""Benchmark of the decode stage against a bare PyAV decode of the same files.

Generates ``--n-ave`` distinct AVE-like clips (10 s, 320x240, 25 fps, 44.1 kHz stereo AAC;
more videos reuse them under other names) and one UnAV-like clip, then, in interleaved
rounds (the order rotates each round, so machine load hits every side alike):

in-process, on ``--n-ave`` videos + the UnAV clip:
  (a) bare PyAV: demux + decode every video and audio frame, no conversion
      (``thread_type="AUTO"``), the floor any decoder built on FFmpeg pays;
  (b) ``decode_shard`` with ``threads=0`` (one video at a time on FFmpeg's threads) and
      (c) with ``threads=--threads`` (that many videos at once, one FFmpeg thread each):
      16 kHz + 32 kHz audio, one 224x224 frame per second, Zarr store written;
as whole processes, on each of ``--process-videos`` (e.g. 10 and 400):
  (d) ``python -c`` bare PyAV over the files vs ``python -m avepipe decode`` on an index of
      them (interpreter start, imports, store written), wall seconds and peak RSS.

Prints video-seconds per second and the ratios (goal >= 0.7), median and range over the
rounds, the 1-min load average before and after, the peak RSS per process size (memory
flat from 10 to 400 videos) and the store's bytes per video.
Run: ``python benchmarks/decode.py [--n-ave 10 --rounds 3 --process-videos 10 400]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd

from avepipe.datasets.writer import write_mp4
from avepipe.decode import decode_shard


def make_clip(path: Path, seconds: float, seed: int, fps: float = 25.0, size=(240, 320),
              rate: int = 44100) -> Path:
    """Moving gradients + noise (so h264 has real work) and a sine + noise, stereo."""
    rng = np.random.default_rng(seed)
    h, w = size
    n = int(seconds * fps)
    y, x = np.mgrid[0:h, 0:w]
    video = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        video[k, ..., 0] = (x + 4 * k + seed * 17) % 256
        video[k, ..., 1] = (y + 2 * k) % 256
        video[k, ..., 2] = rng.integers(64, 192, size=(h, w), dtype=np.uint8)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    audio = np.stack([tone + 0.05 * rng.standard_normal(len(t)) for _ in range(2)]).astype(np.float32)
    return write_mp4(path, video, fps, audio, rate, crf=23)


def bare_decode(paths: list[Path]) -> None:
    """Demux and decode all frames and audio of ``paths`` (no conversion)."""
    for p in paths:
        with av.open(str(p)) as c:
            vs, as_ = c.streams.video[0], c.streams.audio[0]
            vs.thread_type = "AUTO"
            for packet in c.demux(vs, as_):
                for _ in packet.decode():
                    pass


BARE_PROCESS = """
import sys, av
for p in sys.argv[1:]:
    with av.open(p) as c:
        vs, as_ = c.streams.video[0], c.streams.audio[0]
        vs.thread_type = "AUTO"
        for packet in c.demux(vs, as_):
            for _ in packet.decode():
                pass
"""


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_process(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process. The peak is measured by GNU
    ``time`` (a child forked from this large process would count this process's pages)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "@@%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed:\n{r.stderr[-2000:]}")
    return wall, int(r.stderr.rsplit("@@", 1)[1].split()[0]) / 1024


def _rows(paths: list[Path], seconds: float) -> pd.DataFrame:
    return pd.DataFrame({"sample": range(len(paths)), "video_id": [p.stem for p in paths],
                         "split": "test", "path": [str(p) for p in paths], "exists": True,
                         "shard": 0, "duration": float(seconds)})


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _load() -> float:
    return os.getloadavg()[0]


def _stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "rounds": [round(v, 3) for v in values]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ave", type=int, default=10, help="distinct 10-s AVE-like clips (in-process side)")
    ap.add_argument("--unav-seconds", type=float, default=40.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="decode.threads of side (c) and of the process runs")
    ap.add_argument("--process-videos", type=int, nargs="*", default=[10, 400],
                    help="video counts of the whole-process comparison (none: skip it)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    res: dict = {"threads": args.threads, "cores": os.cpu_count(), "load_before": _load()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ave = [make_clip(tmp / f"ave{i:03d}.mp4", 10.0, seed=i) for i in range(args.n_ave)]
        unav = [make_clip(tmp / "unav00.mp4", args.unav_seconds, seed=99)]
        print(f"generated {len(ave)} x 10 s + 1 x {args.unav_seconds:.0f} s clips in {time.perf_counter() - t0:.1f} s")
        total_s = 10.0 * len(ave) + args.unav_seconds

        def stage(threads: int, tag: str) -> None:
            decode_shard(_rows(ave, 10.0), tmp / f"ave-{tag}.zarr", n_segments=10,
                         audio_rates=[16000, 32000], progress=False, threads=threads)
            decode_shard(_rows(unav, args.unav_seconds), tmp / f"unav-{tag}.zarr", n_segments=None,
                         audio_rates=[16000, 32000], progress=False, threads=threads)

        sides = {"bare": lambda: bare_decode(ave + unav), "stage_t0": lambda: stage(0, "t0"),
                 f"stage_t{args.threads}": lambda: stage(args.threads, f"t{args.threads}")}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(timed(sides[name]))
        for name in names[1:]:
            for j, clock in enumerate(("wall", "cpu")):
                ratios = [b[j] / s[j] for b, s in zip(times["bare"], times[name])]
                res[f"{name}_{clock}_ratio"] = _stats(ratios)
                res[f"{name}_{clock}_video_s_per_s"] = total_s / float(np.median([s[j] for s in times[name]]))
        for j, clock in enumerate(("wall", "cpu")):
            res[f"bare_{clock}_video_s_per_s"] = total_s / float(np.median([b[j] for b in times["bare"]]))
        res["ave_store_bytes_per_video"] = _bytes(tmp / "ave-t0.zarr") / len(ave)
        res["unav_store_bytes_per_video"] = _bytes(tmp / "unav-t0.zarr")

        # whole processes: interpreter start, imports and store included
        for n in args.process_videos:
            paths = []
            for i in range(n):  # more videos than distinct clips: the same files under other names
                p = tmp / "many" / f"v{i:04d}.mp4"
                p.parent.mkdir(exist_ok=True)
                if not p.exists():
                    p.symlink_to(ave[i % len(ave)])
                paths.append(p)
            index = tmp / f"index{n}.parquet"
            _rows(paths, 10.0).to_parquet(index, index=False)
            bare_cmd = [sys.executable, "-c", BARE_PROCESS, *map(str, paths)]
            walls, rss = {"bare": [], "stage": []}, {"bare": [], "stage": []}
            for r in range(args.rounds):
                out = tmp / f"proc{n}-{r}.zarr"  # a new store each round, as a Snakemake job writes
                stage_cmd = [sys.executable, "-m", "avepipe", "decode", f"--index={index}", "--shard=0",
                             f"--out={out}", "--n-segments=10", "--sample-frames-per-segment=1",
                             f"--threads={args.threads}", "--rates", "16000", "32000"]
                order = [("bare", bare_cmd), ("stage", stage_cmd)][:: 1 if r % 2 == 0 else -1]
                for name, cmd in order:
                    w, m = run_process(cmd)
                    walls[name].append(w)
                    rss[name].append(m)
            res[f"process_{n}"] = {
                "ratio_wall": _stats([b / s for b, s in zip(walls["bare"], walls["stage"])]),
                "bare_s": _stats(walls["bare"]), "stage_s": _stats(walls["stage"]),
                "bare_peak_rss_mb": max(rss["bare"]), "stage_peak_rss_mb": max(rss["stage"]),
            }
    res["load_after"] = _load()

    print(f"[in process: {args.n_ave} x 10 s + 1 x {args.unav_seconds:.0f} s, {args.rounds} interleaved rounds, "
          f"load {res['load_before']:.1f} -> {res['load_after']:.1f} on {res['cores']} cores]")
    print(f"  (a) bare PyAV demux+decode : {res['bare_wall_video_s_per_s']:8.1f} video-s/s wall, "
          f"{res['bare_cpu_video_s_per_s']:8.1f} per CPU-s")
    for name in names[1:]:
        w, c = res[f"{name}_wall_ratio"], res[f"{name}_cpu_ratio"]
        print(f"  {name:25s}: {res[f'{name}_wall_video_s_per_s']:8.1f} video-s/s; ratio to (a) wall "
              f"{w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f}), CPU {c['median']:.2f} "
              f"({c['min']:.2f}-{c['max']:.2f})  (goal >= 0.7)")
    for n in args.process_videos:
        p = res[f"process_{n}"]
        print(f"[as processes, {n} videos] bare {p['bare_s']['median']:.2f} s, avepipe decode "
              f"{p['stage_s']['median']:.2f} s -> ratio {p['ratio_wall']['median']:.2f} "
              f"({p['ratio_wall']['min']:.2f}-{p['ratio_wall']['max']:.2f}); peak RSS bare "
              f"{p['bare_peak_rss_mb']:.0f} MB, avepipe {p['stage_peak_rss_mb']:.0f} MB")
    print(f"store bytes per video:  AVE-like {res['ave_store_bytes_per_video'] / 1e6:.2f} MB, "
          f"UnAV-like ({args.unav_seconds:.0f} s) {res['unav_store_bytes_per_video'] / 1e6:.2f} MB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
