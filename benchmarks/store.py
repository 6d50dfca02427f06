"""Benchmark of whole feature-set reads: avepipe stores vs h5py reading the same arrays.

Writes an AVE-shaped feature set in the pipeline's own layout (``--shards`` shards of
``write_feature_shard``, default chunking: whole videos per ~8 MiB chunk), visual
(N, 10, 7, 7, C) float16 and audio (N, 10, 128) float32, and the same two arrays as
contiguous h5 datasets in the same dtypes, rows in "manifest order" (a fixed random
permutation of the store order, as the AVE heads ask for them). Then, in interleaved
rounds (the method order rotates every round), times from path to in-memory numpy:

* ``h5``             h5py ``dset[...]`` of both files (the reference);
* ``dask``           ``open_features(dir, video_ids=manifest).features.compute()``;
* ``read``           ``open_features(dir, video_ids=manifest).read()`` (one preallocated array);
* ``read_features``  ``read_features(dir, manifest ids)``;
* ``heads_loader``   ``avepipe.training.ave_data.load_ave_data`` (the AVE heads' own loading: manifest and
  both stores to tensors; one fast-path read per store);
* ``xarray``         ``xarray.open_zarr(shard)["features"].values`` of every shard, concatenated;
* ``xarray_nodask``  the same with ``open_zarr(shard, chunks=None)`` (no dask);
* ``xarray_dir``     ``open_features(dir, xarray=True)["features"].values`` (store order);
* ``before_*``       with ``--before REV``: ``dask`` and ``xarray_dir`` of ``avepipe/store.py``
                     as of git revision REV, on stores written by that code (a side-by-side
                     before/after in one run).

Every method reads visual + audio, checksums included where the store has them. Each
round gives the ratio h5 time / method time (>= 1.0: at least as fast as h5); the summary
prints median and range over rounds, and the median CPU seconds of this process (all
threads) with their ratio, which host load disturbs less than wall time. ``--cache cold``
drops every file of the stores and h5 files from the page cache before each read
(``posix_fadvise(DONTNEED)``; the data is on local disk), ``warm`` reads each method once
untimed first. ``--threads`` sets ``avepipe.store.READ_THREADS``. Methods the installed
avepipe lacks are reported as skipped, so the same script measures the code before and
after a change.

Run: ``python benchmarks/store.py [--videos 4143 --shards 16 --rounds 5 --cache both
--before 61eba6d]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from avepipe import store
from avepipe.store import open_features, write_feature_shard


def load_before(rev: str, root: Path):
    """``avepipe/store.py`` as of git revision ``rev``, imported as a module of its own."""
    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:avepipe/store.py"], check=True,
                         capture_output=True, text=True).stdout
    path = root / "store_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("store_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["store_before"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_data(root: Path, n: int, shards: int, channels: int, seed: int = 0, before=None) -> dict:
    """Feature shards (store order: sorted ids, contiguous shards) + h5 files (manifest order);
    with ``before`` (an older store module) the same shards written by it too."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"v{i:05d}" for i in range(n)])
    manifest = rng.permutation(n)                # h5 row k holds video ids[manifest[k]]
    where = np.empty(n, np.int64)
    where[manifest] = np.arange(n)               # h5 row of store row i
    bounds = np.linspace(0, n, shards + 1).astype(int)
    with h5py.File(root / "visual.h5", "w") as hv, h5py.File(root / "audio.h5", "w") as ha:
        dv = hv.create_dataset("avadataset", shape=(n, 10, 7, 7, channels), dtype="float16", track_times=False)
        dav = ha.create_dataset("avadataset", shape=(n, 10, 128), dtype="float32", track_times=False)
        for s in range(shards):
            lo, hi = bounds[s], bounds[s + 1]
            # pool5-like maps: ReLU of a normal, float16 as the store keeps them
            vis = np.maximum(rng.standard_normal((hi - lo, 10, 7, 7, channels), dtype=np.float32), 0)
            vis = vis.astype(np.float16)
            aud = rng.standard_normal((hi - lo, 10, 128), dtype=np.float32)
            write_feature_shard(root / "vis" / f"shard-{s:03d}.zarr", list(ids[lo:hi]), vis)
            write_feature_shard(root / "aud" / f"shard-{s:03d}.zarr", list(ids[lo:hi]), aud, dtype="float32")
            if before is not None:
                before.write_feature_shard(root / "old_vis" / f"shard-{s:03d}.zarr", list(ids[lo:hi]), vis)
                before.write_feature_shard(root / "old_aud" / f"shard-{s:03d}.zarr", list(ids[lo:hi]), aud,
                                           dtype="float32")
            order = np.argsort(where[lo:hi])  # h5py wants increasing indices
            dv[where[lo:hi][order]] = vis[order]
            dav[where[lo:hi][order]] = aud[order]
            del vis, aud
    return {"ids": ids, "manifest_ids": list(ids[manifest])}


def files_under(*paths: Path) -> list[Path]:
    out = []
    for p in paths:
        out += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return out


def drop_cache(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (clean pages; the files were fsynced once)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def methods(root: Path, data: dict, before=None) -> dict:
    ids = data["manifest_ids"]
    vis, aud = root / "vis", root / "aud"

    def h5():
        with h5py.File(root / "visual.h5", "r") as f, h5py.File(root / "audio.h5", "r") as g:
            return f["avadataset"][...], g["avadataset"][...]

    def dask():
        return (open_features(vis, video_ids=ids).features.compute(),
                open_features(aud, video_ids=ids).features.compute())

    def read():
        return open_features(vis, video_ids=ids).read(), open_features(aud, video_ids=ids).read()

    def read_features():
        return store.read_features(vis, ids).features, store.read_features(aud, ids).features

    def heads_loader():
        # what `avepipe train` runs for the AVE heads: manifest + both stores -> tensors per split
        import pandas as pd

        from avepipe.training.ave_data import load_ave_data

        man = pd.DataFrame({"video_id": ids, "split": "train", "label": 0, "start": 0, "end": 10})
        tr = load_ave_data(man, vis, aud).splits["train"]
        return tr.visual.numpy(), tr.audio.numpy()

    def xarray():
        import xarray as xr

        return tuple(np.concatenate([xr.open_zarr(s)["features"].values for s in store.shard_paths(d)])
                     for d in (vis, aud))

    def xarray_nodask():
        import xarray as xr

        return tuple(np.concatenate([xr.open_zarr(s, chunks=None)["features"].values
                                     for s in store.shard_paths(d)]) for d in (vis, aud))

    def xarray_dir():
        return (open_features(vis, xarray=True)["features"].values,
                open_features(aud, xarray=True)["features"].values)

    def before_dask():
        return (before.open_features(root / "old_vis", video_ids=ids).features.compute(),
                before.open_features(root / "old_aud", video_ids=ids).features.compute())

    def before_xarray_dir():
        return (before.open_features(root / "old_vis", xarray=True)["features"].values,
                before.open_features(root / "old_aud", xarray=True)["features"].values)

    found = {"h5": h5, "dask": dask}
    if hasattr(store.FeatureSet, "read"):
        found["read"] = read
    if hasattr(store, "read_features"):
        found["read_features"] = read_features
    found["heads_loader"] = heads_loader
    found["xarray"] = xarray
    found["xarray_nodask"] = xarray_nodask
    found["xarray_dir"] = xarray_dir
    if before is not None:
        found["before_dask"] = before_dask
        found["before_xarray_dir"] = before_xarray_dir
    return found


def check(found: dict, data: dict) -> dict:
    """Every method must return the h5 arrays (store-order methods permuted back)."""
    ref_v, ref_a = found["h5"]()
    pos = {v: k for k, v in enumerate(data["manifest_ids"])}
    to_manifest = np.array([pos[v] for v in data["ids"]])  # store row -> h5 row
    status = {}
    for name, fn in found.items():
        if name == "h5":
            continue
        try:
            v, a = fn()
        except Exception as exc:  # noqa: BLE001 - today's code may not support a method
            status[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        if name.startswith("xarray") or name.endswith("xarray_dir"):  # store order
            ok = np.array_equal(v, ref_v[to_manifest]) and np.array_equal(a, ref_a[to_manifest])
        else:
            ok = np.array_equal(v, ref_v) and np.array_equal(a, ref_a)
        status[name] = "ok" if ok else "WRONG VALUES"
        del v, a
    return status


def run(found: dict, files: list[Path], rounds: int, cache: str) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds (this process, all threads) of every method, per round."""
    names = list(found)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    if cache == "warm":
        for n in names:
            found[n]()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if cache == "cold":
                drop_cache(files)
            t0, c0 = time.perf_counter(), time.process_time()
            out = found[n]()
            times[n]["wall"].append(time.perf_counter() - t0)
            times[n]["cpu"].append(time.process_time() - c0)
            del out
    return times


def summarise(times: dict[str, dict[str, list[float]]]) -> dict:
    h5 = times["h5"]
    res = {}
    for n, t in times.items():
        ts = t["wall"]
        ratios = [h / x for h, x in zip(h5["wall"], ts)]
        cpu_ratios = [h / x for h, x in zip(h5["cpu"], t["cpu"])]
        res[n] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                  "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                  "ratio_max": max(ratios), "cpu_median_s": statistics.median(t["cpu"]),
                  "cpu_ratio_median": statistics.median(cpu_ratios), "times_s": ts, "cpu_s": t["cpu"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4143)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--channels", type=int, default=512, help="512 as VGG-19 pool5, 2048 as ResNet-50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    ap.add_argument("--methods", nargs="+", help="subset of methods (h5 is always included)")
    ap.add_argument("--threads", type=int, help="avepipe.store.READ_THREADS (default: the module's)")
    ap.add_argument("--dir", help="where to write the data (default: a temporary directory)")
    ap.add_argument("--before", metavar="REV", help="also measure avepipe/store.py of this git revision")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.threads and hasattr(store, "READ_THREADS"):
        store.READ_THREADS = a.threads
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        before = load_before(a.before, root) if a.before else None
        data = make_data(root, a.videos, a.shards, a.channels, before=before)
        os.sync()  # dirty pages cannot be dropped: make every file clean first
        files = files_under(*[p for p in (root / "vis", root / "aud", root / "old_vis", root / "old_aud")
                              if p.exists()], root / "visual.h5", root / "audio.h5")
        size = lambda p: sum(f.stat().st_size for f in files_under(p))  # noqa: E731
        results: dict = {"videos": a.videos, "shards": a.shards, "channels": a.channels,
                         "bytes": {"zarr": size(root / "vis") + size(root / "aud"),
                                   "h5": size(root / "visual.h5") + size(root / "audio.h5")},
                         "load_avg": os.getloadavg(), "cpus": os.cpu_count(), "before": a.before,
                         "read_threads": getattr(store, "READ_THREADS", None),
                         "write_s": time.perf_counter() - t0}
        found = methods(root, data, before)
        if a.methods:
            found = {k: v for k, v in found.items() if k == "h5" or k in a.methods}
        results["check"] = check(found, data)
        print(f"{a.videos} videos in {a.shards} shards, visual (N,10,7,7,{a.channels}) float16 + "
              f"audio (N,10,128) float32: zarr {results['bytes']['zarr'] / 1e9:.2f} GB, "
              f"h5 {results['bytes']['h5'] / 1e9:.2f} GB; load {results['load_avg'][0]:.2f}")
        for n, s in results["check"].items():
            print(f"  check {n:<14} {s}")
        found = {k: v for k, v in found.items() if k == "h5" or results["check"].get(k) == "ok"}
        for cache in (["warm", "cold"] if a.cache == "both" else [a.cache]):
            res = results[cache] = summarise(run(found, files, a.rounds, cache))
            print(f"{cache} page cache, {a.rounds} interleaved rounds (ratio = h5 time / method time; "
                  f"load {os.getloadavg()[0]:.2f}):")
            for n, r in res.items():
                print(f"  {n:<14} median {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})  "
                      f"ratio {r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  "
                      f"cpu {r['cpu_median_s']:.3f} s, cpu ratio {r['cpu_ratio_median']:.2f}")
        results["load_avg_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
