"""Benchmark of the extraction stage: the whole stage against the bare model, the data path.

On ``--videos`` synthetic 10-s 640x360 clips (25 fps, h264) decoded by the real decode stage,
at ``--fps`` frames per second (AVE: 16), in interleaved rounds (the order rotates each
round, so machine load hits every side alike):

(a) bare model: the encoder's torchvision trunk as avepipe builds it, channels_last, no
    inference fusions, over the same frames, preprocessed beforehand, at ``--batch``;
(b) fused model: the same with the encoder's inference fusions (ResNet-50: BatchNorm
    folded into the convolutions), model time alone;
(c) pipeline: ``extract_shard`` end to end (decode workers, preprocessing, model, Zarr
    write), model load excluded; its stats give the share of wall time the model waited.
Ratios (c)/(a) and (b)/(a), median and range over rounds (goal (c)/(a) >= 0.9).

Then, once each (``--data-path``):
(d) CPU seconds per video of the visual data path (decode + select + resize + normalise,
    no model) for the AVE config's visual stores (VGG-19 ``ave``, ResNet-50, ResNet-50 ft):
    before = each store decodes on its own as before issue 16 (VGG-19: count pass + read
    pass, torch cv2 resize; ResNet-50: read pass + torchvision's float resize), after = one
    shared frames pass for VGG-19 + ResNet-50 (writing the frames store; each reader reads
    its recipe) + ResNet-50 ft on its own;
(e) decode + preprocess frames per second per core (one thread) for each recipe, resize on
    the CPU or left to the device, and the preprocessing alone on the CPU: uint8 kernels
    (the CPU path) vs the float form the device uses, run on the CPU;
(f) the frames store: MB per video per recipe and its write/read speed.

Random weights (no download). Run: ``python benchmarks/extract.py [--videos 2 --fps 16]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from avepipe import frames as fr
from avepipe import media
from avepipe.datasets.writer import write_mp4
from avepipe.decode import decode_shard
from avepipe.encoders import get_encoder
from avepipe.extract import extract_shard

ENCODERS = {"resnet50": {}, "vgg19": {"preprocessing": "ave"}}


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


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (decode workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def model_fps(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Frames/s of ``model`` over ``x`` (channels_last) in batches; one untimed warm-up batch."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x[:batch])
        t0 = time.perf_counter()
        for b in range(0, len(x), batch):
            model(x[b:b + batch])
    return len(x) / (time.perf_counter() - t0)


def _stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "rounds": [round(v, 3) for v in values]}


def bench_encoder(name: str, root: Path, index: pd.DataFrame, fps: int, batch: int, rounds: int,
                  workers: int | None) -> dict:
    opts = ENCODERS[name]
    spec = get_encoder(name)
    options = spec.check_options(opts)
    t0 = time.perf_counter()
    loaded = spec.load("random", device="cpu", **opts)
    load_s = time.perf_counter() - t0
    bare = loaded.model.eval()
    fused = bare.fused_for_inference() if hasattr(bare, "fused_for_inference") else bare
    recipe = fr.recipe_of(name, options, fps)
    # the frames the pipeline sees (its own data path), preprocessed once
    xs = []
    for p in index["path"]:
        sel = fr.decode_recipes(p, {"r": recipe}, np.arange(10.0), 1.0, 10.0)["r"]
        xs.append(fr.preprocess(recipe, torch.from_numpy(sel.frames))[torch.from_numpy(sel.take)])
    x = torch.cat(xs)
    sides = {"bare": lambda: model_fps(bare, x, batch), "fused": lambda: model_fps(fused, x, batch)}
    waits = []

    def pipeline() -> float:
        out = root / f"{name}-{time.perf_counter_ns()}.zarr"
        stats = out.with_suffix(".json")
        t = time.perf_counter()
        extract_shard(root / "decoded.zarr", index, name, "random", out, frames_per_segment=fps, batch_size=batch,
                      num_workers=workers, progress=False, stats=stats, **opts)
        wall = time.perf_counter() - t
        waits.append(json.loads(stats.read_text())["data_wait_share"])
        return len(x) / max(1e-9, wall - load_s)

    sides["pipeline"] = pipeline
    got: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            got[k].append(sides[k]())
    return {
        "encoder": name, "frames": len(x), "batch": batch, "load_s": load_s,
        "frames_per_s": {k: _stats(v) for k, v in got.items()},
        "pipeline_over_bare": _stats([p / b for p, b in zip(got["pipeline"], got["bare"])]),
        "fused_over_bare": _stats([f / b for f, b in zip(got["fused"], got["bare"])]),
        "data_wait_share": _stats(waits),
    }


# ----------------------------------------------------------------------------- data path
def _old_vgg19_ave(path: str, fps: int) -> torch.Tensor:
    from avepipe.encoders.vgg19 import preprocess_ave
    from avepipe.frames import script_frame_indices

    n = media.count_frames(path)
    frames = media.read_frames_by_index(path, script_frame_indices(n, np.arange(10.0), 1.0, fps, 10.0))
    return preprocess_ave(torch.from_numpy(frames))


def _old_resnet50(path: str, fps: int) -> torch.Tensor:
    from torchvision.models import ResNet50_Weights

    frames = media.read_frames(path, media.segment_times(10, fps))
    return ResNet50_Weights.IMAGENET1K_V2.transforms()(torch.from_numpy(frames).permute(0, 3, 1, 2))


def data_path_cpu(root: Path, index: pd.DataFrame, fps: int) -> dict:
    """CPU seconds per video of the visual data path of the AVE config, before and after."""
    torch.set_num_threads(1)
    paths = list(index["path"])
    recipes = fr.recipes_for({"vgg19": {"frames_per_segment": fps, "preprocessing": "ave"},
                              "resnet50": {"frames_per_segment": fps}})
    n = len(paths)
    out: dict = {}
    c = cpu_s()
    for p in paths:
        _old_vgg19_ave(p, fps)
        _old_resnet50(p, fps)
        _old_resnet50(p, fps)  # resnet50_ft: the same again
    out["before_s_per_video"] = (cpu_s() - c) / n
    c = cpu_s()
    store = root / f"frames-{time.perf_counter_ns()}.zarr"
    fr.write_frames_shard(root / "decoded.zarr", index, list(recipes.values()), store, workers=0, progress=False)
    shared_write = (cpu_s() - c) / n
    c = cpu_s()
    reader = fr.FramesReader(store)
    for vid in index["video_id"]:
        for enc, r in recipes.items():
            frames, take = reader.get(r.key, vid)
            fr.normalize_frames(r, torch.from_numpy(frames))
    shared_read = (cpu_s() - c) / n
    c = cpu_s()
    r = recipes["resnet50"]
    for p in paths:  # resnet50_ft decodes on its own
        sel = fr.decode_recipes(p, {"r": r}, np.arange(10.0), 1.0, 10.0)["r"]
        fr.normalize_frames(r, torch.from_numpy(sel.frames))
    ft_own = (cpu_s() - c) / n
    out.update(after_s_per_video=shared_write + shared_read + ft_own, after_frames_job_s_per_video=shared_write,
               after_readers_s_per_video=shared_read, after_ft_own_decode_s_per_video=ft_own)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    out["frames_store_mb_per_video"] = size / 1e6 / n
    out["frames_store_mb_per_video_per_recipe"] = size / 1e6 / n / len({r.key for r in recipes.values()})
    out["raw_mb_per_video_per_recipe"] = 10 * fps * 224 * 224 * 3 / 1e6
    return out


def per_core(index: pd.DataFrame, fps: int) -> dict:
    """Decode + preprocess frames/s on one core per recipe, and preprocessing alone."""
    torch.set_num_threads(1)
    paths = list(index["path"])
    out = {}
    for enc, opts in ENCODERS.items():
        r = fr.recipe_of(enc, get_encoder(enc).check_options(opts), fps)
        for resize in (True, False) if r.device_resize else (True,):
            c, t, nf = cpu_s(), time.perf_counter(), 0
            for p in paths:
                sel = fr.decode_recipes(p, {"r": r}, np.arange(10.0), 1.0, 10.0, resize=resize, threads=1)["r"]
                if resize:
                    fr.normalize_frames(r, torch.from_numpy(sel.frames))
                nf += len(sel.take)
            key = f"{enc}:{'decode+resize+normalize on CPU' if resize else 'decode only (resize on the device)'}"
            out[key] = {"frames_per_cpu_s": nf / (cpu_s() - c), "frames_per_s": nf / (time.perf_counter() - t)}
        if r.device_resize:  # the preprocessing alone: CPU uint8 kernels vs the device's float form on the CPU
            raw = media.read_frames(paths[0], media.segment_times(10, fps))
            for on_device in (False, True):
                c = cpu_s()
                fr.preprocess(r, torch.from_numpy(raw), on_device=on_device)
                out[f"{enc}:preprocess only, {'float (device form)' if on_device else 'uint8 (CPU form)'} on the CPU"] = {
                    "frames_per_cpu_s": len(raw) / (cpu_s() - c)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--fps", type=int, default=16, help="frames per 1-s segment (AVE: 16)")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: sized by the stage)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-data-path", action="store_true", help="skip (d)-(f)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results: dict = {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_before": os.getloadavg()[0],
                     "fps": a.fps, "videos": a.videos}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [make_clip(root / f"clip{i}.mp4", i) for i in range(a.videos)]
        index = pd.DataFrame({"video_id": [p.stem for p in paths], "path": [str(p) for p in paths], "duration": 10.0})
        decode_shard(index, root / "decoded.zarr", n_segments=10, audio_rates=[16000], progress=False)
        for name in a.encoders:
            r = results[name] = bench_encoder(name, root, index, a.fps, a.batch, a.rounds, a.workers)
            f, p, w = r["frames_per_s"], r["pipeline_over_bare"], r["data_wait_share"]
            print(f"{name} ({r['frames']} frames, batch {a.batch}, {a.rounds} rounds): bare {f['bare']['median']:.2f} f/s, "
                  f"fused {f['fused']['median']:.2f}, pipeline {f['pipeline']['median']:.2f} -> pipeline/bare "
                  f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) (goal >= 0.9); fused/bare "
                  f"{r['fused_over_bare']['median']:.2f}; model waited for data {100 * w['median']:.1f}% of the time")
        if not a.no_data_path:
            d = results["data_path_cpu"] = data_path_cpu(root, index, a.fps)
            print(f"data path CPU s per video (AVE config visual stores: vgg19 ave + resnet50 + resnet50_ft, "
                  f"{a.fps} fps): before {d['before_s_per_video']:.2f}, after {d['after_s_per_video']:.2f} "
                  f"(frames job {d['after_frames_job_s_per_video']:.2f} + readers {d['after_readers_s_per_video']:.2f}"
                  f" + ft own decode {d['after_ft_own_decode_s_per_video']:.2f}) -> {d['before_s_per_video'] / d['after_s_per_video']:.2f}x less")
            print(f"frames store: {d['frames_store_mb_per_video']:.1f} MB per video for 2 recipes "
                  f"({d['frames_store_mb_per_video_per_recipe']:.1f} per recipe; raw {d['raw_mb_per_video_per_recipe']:.1f})")
            pc = results["per_core"] = per_core(index, a.fps)
            for k, v in pc.items():
                print(f"  {k}: {v['frames_per_cpu_s']:.1f} frames per CPU-second")
    results["load_after"] = os.getloadavg()[0]
    print(f"load (1-min) {results['load_before']:.1f} -> {results['load_after']:.1f} on {results['cores']} cores, "
          f"{results['threads']} torch threads")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
