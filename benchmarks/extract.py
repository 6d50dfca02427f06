"""Benchmark of the extraction stage and of feature-store reads.

In one run, on synthetic 10-s clips (``avepipe.datasets.writer.write_mp4``) decoded by
the real decode stage:

(a) bare model: the encoder's forward alone on the same preprocessed frames, over a
    sweep of batch sizes and memory formats (NCHW vs channels_last), frames/s;
(b) pipeline: ``extract_shard`` (PyAV decode + preprocess in a DataLoader worker,
    model in the main process, Zarr write), frames/s without the one-off model load;
    ratio (b)/(a) at the same batch size, channels_last (goal >= 0.9);
(c) store read: all features of a store from Zarr (dask) vs h5py reading the legacy h5
    that ``export_h5`` writes from it (goal: h5 time / Zarr time >= 1.0);
(d) bytes per video of each store.

Random weights (no download). Run: ``python benchmarks/extract.py [--videos 2 --fps 2]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from avepipe import media
from avepipe.datasets.writer import write_mp4
from avepipe.decode import decode_shard
from avepipe.encoders import get_encoder
from avepipe.extract import extract_shard
from avepipe.interop import export_h5
from avepipe.store import inspect_store, open_features, write_feature_shard


def make_clip(path: Path, seed: int, seconds: int = 10, fps: float = 25.0, size=(360, 640)) -> Path:
    """Moving gradients + noise (real work for h264) and a noisy tone."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    video = np.empty((int(seconds * fps), h, w, 3), np.uint8)
    for k in range(len(video)):
        video[k, ..., 0] = (x + 4 * k + seed * 17) % 256
        video[k, ..., 1] = (y + 2 * k) % 256
        video[k, ..., 2] = rng.integers(64, 192, size=(h, w), dtype=np.uint8)
    t = np.arange(seconds * 44100) / 44100
    audio = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t)))[None].astype(np.float32)
    return write_mp4(path, video, fps, audio, 44100, crf=23)


def bare_fps(model: torch.nn.Module, x: torch.Tensor, batch: int, channels_last: bool, reps: int = 1) -> float:
    """Frames/s of ``model`` over ``x`` in batches (one warm-up batch first, not timed)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    with torch.inference_mode():
        model(x[:batch].contiguous(memory_format=fmt))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in range(0, len(x), batch):
                model(x[b:b + batch].contiguous(memory_format=fmt))
            best = min(best, time.perf_counter() - t0)
    return len(x) / best


def nchw_trunk(name: str, state: dict) -> torch.nn.Module:
    """The torchvision trunk (NCHW in, NCHW out) with the encoder's weights, for the format sweep."""
    import torchvision

    with torch.device("meta"):
        tv = getattr(torchvision.models, name)()
    if name == "vgg19":
        tv.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, assign=True)
        return tv.features.eval()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=False, assign=True)
    return torch.nn.Sequential(*[m for n, m in tv.named_children() if n not in ("avgpool", "fc")]).eval()


def bench_encoder(name: str, root: Path, index: pd.DataFrame, fps: int, batches: list[int],
                  workers: int) -> dict:
    spec = get_encoder(name)
    t0 = time.perf_counter()
    loaded = spec.load("random", device="cpu")
    load_s = time.perf_counter() - t0
    # the same frames the pipeline sees, preprocessed once
    frames = [media.read_frames(p, media.segment_times(10, fps)) for p in index["path"]]
    x = torch.cat([loaded.preprocess(torch.from_numpy(f)) for f in frames])
    trunk = nchw_trunk(name, loaded.model.state_dict())
    sweep = {}
    for b in batches:
        for cl in (False, True):
            sweep[f"b{b}-{'cl' if cl else 'nchw'}"] = bare_fps(trunk, x, b, cl)
    best = max(sweep, key=sweep.get)
    batch = int(best.split("-")[0][1:])
    bare = bare_fps(loaded.model, x, batch, True)  # the encoder module itself, as extract uses it
    t0 = time.perf_counter()
    out = extract_shard(root / "decoded.zarr", index, name, "random", root / f"{name}.zarr",
                        frames_per_segment=fps, batch_size=batch, num_workers=workers, progress=False)
    total = time.perf_counter() - t0
    n_frames = len(x)
    pipe = n_frames / max(1e-9, total - load_s)
    info = inspect_store(out)
    return {"encoder": name, "frames": n_frames, "sweep_frames_per_s": sweep, "best": best,
            "bare_frames_per_s": bare, "pipeline_frames_per_s": pipe,
            "pipeline_incl_load_frames_per_s": n_frames / total, "load_s": load_s,
            "ratio": pipe / bare, "bytes_per_video": info["bytes_per_video"]}


def bench_audio(name: str, root: Path, index: pd.DataFrame, workers: int) -> dict:
    """Audio encoders read the decoded waveform: seconds of audio per second, bytes per video."""
    t0 = time.perf_counter()
    out = extract_shard(root / "decoded.zarr", index, name, "random", root / f"{name}.zarr",
                        num_workers=workers, progress=False)
    total = time.perf_counter() - t0
    info = inspect_store(out)
    return {"encoder": name, "audio_s_per_s": 10 * len(index) / total,
            "bytes_per_video": info["bytes_per_video"]}


def bench_store(root: Path, n: int, channels: int = 512, reps: int = 3) -> dict:
    """Zarr (dask) vs h5py read of all visual + audio features of ``n`` AVE-shaped videos
    (visual maps (10,7,7,channels): 512 as VGG-19, 2048 as ResNet-50)."""
    root = root / f"store{channels}"
    rng = np.random.default_rng(0)
    ids = [f"v{i:05d}" for i in range(n)]
    # pool5-like: ReLU maps (about half zeros), float16 as the store keeps them
    vis = np.maximum(rng.standard_normal((n, 10, 7, 7, channels), dtype=np.float32), 0)
    aud = rng.standard_normal((n, 10, 128), dtype=np.float32)
    write_feature_shard(root / "sv" / "shard-000.zarr", ids, vis)
    write_feature_shard(root / "sa" / "shard-000.zarr", ids, aud, dtype="float32")
    idx = pd.DataFrame({"sample": range(n), "video_id": ids, "split": "train", "label": 0,
                        "start": 0, "end": 10})
    export_h5(idx, open_features(root / "sv"), open_features(root / "sa"), root / "h5")

    def zarr_read():
        return open_features(root / "sv").features.compute(), open_features(root / "sa").features.compute()

    def h5_read():
        with h5py.File(root / "h5" / "visual_feature.h5") as f, h5py.File(root / "h5" / "audio_feature.h5") as g:
            return f["avadataset"][...], g["avadataset"][...]

    def best(fn):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    tz, th = best(zarr_read), best(h5_read)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    return {"videos": n, "channels": channels, "zarr_s": tz, "h5_s": th, "ratio_h5_over_zarr": th / tz,
            "zarr_bytes_per_video": (size(root / "sv") + size(root / "sa")) / n,
            "h5_bytes_per_video": ((root / "h5" / "visual_feature.h5").stat().st_size
                                   + (root / "h5" / "audio_feature.h5").stat().st_size) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--fps", type=int, default=2, help="frames per 1-s segment")
    ap.add_argument("--encoders", nargs="+", default=["resnet50", "vgg19", "vggish"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--store-videos", type=int, default=200)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [make_clip(root / f"clip{i}.mp4", i) for i in range(a.videos)]
        index = pd.DataFrame({"video_id": [p.stem for p in paths], "path": [str(p) for p in paths],
                              "duration": 10.0})
        decode_shard(index, root / "decoded.zarr", n_segments=10, audio_rates=[16000], progress=False)
        for name in a.encoders:
            if get_encoder(name).modality == "audio":
                r = results[name] = bench_audio(name, root, index, a.workers)
                print(f"{name}: {r['audio_s_per_s']:.1f} s of audio per s (incl. load); "
                      f"{r['bytes_per_video'] / 1e3:.1f} kB/video")
                continue
            r = bench_encoder(name, root, index, a.fps, a.batches, a.workers)
            results[name] = r
            print(f"{name}: bare {r['bare_frames_per_s']:.2f} f/s ({r['best']}), pipeline "
                  f"{r['pipeline_frames_per_s']:.2f} f/s -> ratio {r['ratio']:.2f} (goal >= 0.9); "
                  f"{r['bytes_per_video'] / 1e3:.0f} kB/video; sweep "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["sweep_frames_per_s"].items()))
        for channels, n in ((512, a.store_videos), (2048, max(1, a.store_videos // 4))):
            s = bench_store(root, n, channels)
            results[f"store{channels}"] = s
            print(f"store read ({s['videos']} videos, {channels} ch): zarr {s['zarr_s']:.3f} s, h5 {s['h5_s']:.3f} s -> "
                  f"ratio {s['ratio_h5_over_zarr']:.2f} (goal >= 1.0); "
                  f"{s['zarr_bytes_per_video'] / 1e3:.0f} kB/video zarr vs {s['h5_bytes_per_video'] / 1e3:.0f} kB h5")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
