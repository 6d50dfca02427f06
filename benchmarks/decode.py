"""Benchmark of the decode stage against a bare PyAV decode of the same files.

Generates AVE-like clips (10 s, 320x240, 25 fps, 44.1 kHz stereo AAC) and one
UnAV-like clip (40 s), then measures in the same run:

(a) bare PyAV: demux + decode every video frame and audio frame, no conversion
    (``thread_type="AUTO"``), the floor any decoder built on FFmpeg pays;
(b) the decode stage: ``decode_shard`` on the same files (16 kHz + 32 kHz audio,
    one 224x224 frame per second, Zarr store written).

Prints video-seconds per second of each, their ratio (goal >= 0.7) and the
store's bytes per video. Run: ``python benchmarks/decode.py [--n-ave 8]``.
"""
from __future__ import annotations

import argparse
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


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _rows(paths: list[Path], seconds: float) -> pd.DataFrame:
    return pd.DataFrame({"sample": range(len(paths)), "video_id": [p.stem for p in paths],
                         "split": "test", "path": [str(p) for p in paths], "exists": True,
                         "shard": 0, "duration": float(seconds)})


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ave", type=int, default=8, help="number of 10-s AVE-like clips")
    ap.add_argument("--unav-seconds", type=float, default=40.0)
    ap.add_argument("--repeats", type=int, default=2, help="alternate (a)/(b) this often; best kept")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ave = [make_clip(tmp / f"ave{i:02d}.mp4", 10.0, seed=i) for i in range(args.n_ave)]
        unav = [make_clip(tmp / "unav00.mp4", args.unav_seconds, seed=99)]
        print(f"generated {len(ave)} x 10 s + 1 x {args.unav_seconds:.0f} s clips "
              f"in {time.perf_counter() - t0:.1f} s")
        total_s = 10.0 * len(ave) + args.unav_seconds

        def stage(r: int) -> None:
            decode_shard(_rows(ave, 10.0), tmp / f"ave-{r}.zarr", n_segments=10,
                         audio_rates=[16000, 32000], progress=False)
            decode_shard(_rows(unav, args.unav_seconds), tmp / f"unav-{r}.zarr", n_segments=None,
                         audio_rates=[16000, 32000], progress=False)

        bare_t, stage_t = [], []
        for r in range(args.repeats):  # alternate so that machine load hits both alike
            bare_t.append(timed(bare_decode, ave + unav))
            stage_t.append(timed(stage, r))
        res = {}
        for j, clock in enumerate(("wall", "cpu")):
            res[f"bare_{clock}_video_s_per_s"] = total_s / min(t[j] for t in bare_t)
            res[f"stage_{clock}_video_s_per_s"] = total_s / min(t[j] for t in stage_t)
            res[f"ratio_{clock}"] = res[f"stage_{clock}_video_s_per_s"] / res[f"bare_{clock}_video_s_per_s"]
        res["ave_store_bytes_per_video"] = _bytes(tmp / "ave-0.zarr") / len(ave)
        res["unav_store_bytes_per_video"] = _bytes(tmp / "unav-0.zarr")
    for clock, what in (("wall", "wall clock"), ("cpu", "CPU time, all threads")):
        print(f"[{what}]")
        print(f"  (a) bare PyAV demux+decode : {res[f'bare_{clock}_video_s_per_s']:8.1f} video-s/s")
        print(f"  (b) decode stage           : {res[f'stage_{clock}_video_s_per_s']:8.1f} video-s/s")
        print(f"  ratio (b)/(a)              : {res[f'ratio_{clock}']:8.2f}  (goal >= 0.7)")
    print(f"store bytes per video:  AVE-like {res['ave_store_bytes_per_video'] / 1e6:.2f} MB, "
          f"UnAV-like ({args.unav_seconds:.0f} s) {res['unav_store_bytes_per_video'] / 1e6:.2f} MB")
    return res


if __name__ == "__main__":
    main()
