"""Feature stores: one Zarr v3 group per shard, read back lazily with dask.

Layout (docs/contracts.md "Feature shard")::

    features   (n, T, ...)  float16 (visual maps, default) | float32; ~8 MiB chunks of whole videos
    video_id   (n,) str     lengths (n,) int32     timestamps (n, T) float64 (NaN past length)
    status     (n,) str     reason  (n,) str       attrs: provenance

A shard is written into ``<out>.tmp-<pid>`` and renamed when complete, so a shard
that exists is whole. Chunks hold as many whole videos as fit in ~8 MiB: zarr pays a
fixed cost per chunk, so one-video chunks made a full read 4-7x slower than the legacy
h5 (benchmarks/extract.py), and small audio rows would be thousands of tiny files.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import dask.array as da
import numpy as np
import zarr

CHUNK_TARGET_BYTES = 8 << 20  # whole videos per chunk, up to ~8 MiB (one file each)
READ_BLOCK_BYTES = 256 << 20  # dask task size when reading: one zarr call per ~256 MiB of rows
# zarr's default of 10 concurrent chunk reads costs more than it gains on a local disk with
# few cores (benchmarks/extract.py: a full read ~2x faster at 2); ZARR_ASYNC__CONCURRENCY overrides.
if "ZARR_ASYNC__CONCURRENCY" not in os.environ:
    zarr.config.set({"async.concurrency": 2})
# Features are stored uncompressed by default: on the benchmark (benchmarks/extract.py)
# zstd/blosc decoding made a full read 2-3x slower while saving ~40% on synthetic maps;
# float16 already halves the legacy float32 h5. "zstd" / "blosc-lz4" are options for archives.
COMPRESSION = {
    None: None,
    "zstd": lambda: zarr.codecs.ZstdCodec(level=3),
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}
_STR_ARRAYS = ("video_id", "status", "reason")


# --------------------------------------------------------------------------- writing
def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_TARGET_BYTES // max(1, row_bytes))


class FeatureShardWriter:
    """Incremental writer of one feature shard (rows may arrive one video at a time).

    ``write(i, ...)`` buffers rows and flushes whole sharding-codec blocks so each
    block file is written once; ``commit()`` flushes, stores attrs and renames the
    temporary directory to ``out``. Used as a context manager, an exception removes
    the temporary directory and leaves no partial store behind.
    """

    def __init__(
        self,
        out: str | Path,
        video_ids: Sequence[str],
        n_steps: int,
        step_shape: tuple[int, ...],
        dtype: str = "float16",
        provenance: dict | None = None,
        compression: str | None = None,
    ) -> None:
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {list(COMPRESSION)}, got {compression!r}")
        self.out = Path(out)
        self.n = len(video_ids)
        self.T = int(n_steps)
        self.step_shape = tuple(int(s) for s in step_shape)
        self.dtype = np.dtype(dtype)
        self.provenance = provenance or {}
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)

        row_bytes = int(np.prod((self.T, *self.step_shape))) * self.dtype.itemsize
        self.block = min(max(1, self.n), _rows_per_chunk(row_bytes))
        shape = (self.n, self.T, *self.step_shape)
        # rows are buffered and written a whole chunk at a time (each chunk file written once)
        self.features = self.group.create_array(
            "features", shape=shape, chunks=(self.block, self.T, *self.step_shape), dtype=self.dtype,
            fill_value=0, dimension_names=["video", "step", *[f"d{i}" for i in range(len(self.step_shape))]],
            compressors=COMPRESSION[compression]() if compression else None,
        )
        self.lengths = np.zeros(self.n, np.int32)
        self.timestamps = np.full((self.n, self.T), np.nan)
        self.status = np.array(["failed"] * self.n, dtype=object)
        self.reason = np.array(["not written"] * self.n, dtype=object)
        self.video_ids = np.array([str(v) for v in video_ids], dtype=object)
        self._pending: dict[int, np.ndarray] = {}
        self._flushed = np.zeros(self.n, bool)

    def write(
        self,
        i: int,
        features: np.ndarray | None,
        timestamps: Iterable[float] | None = None,
        status: str = "ok",
        reason: str = "",
    ) -> None:
        """Row ``i``: ``features`` (L, *step_shape) with L <= T real steps (None -> failed, zeros)."""
        row = np.zeros((self.T, *self.step_shape), self.dtype)
        length = 0
        if features is not None:
            f = np.asarray(features)
            if f.shape[1:] != self.step_shape or f.shape[0] > self.T:
                raise ValueError(
                    f"video {self.video_ids[i]}: features {f.shape} do not fit "
                    f"(<= {self.T}, {self.step_shape})"
                )
            length = f.shape[0]
            row[:length] = f
        ts = np.full(self.T, np.nan)
        if timestamps is not None:
            t = np.asarray(list(timestamps), float)[:length]
            ts[: len(t)] = t
        self.lengths[i] = length
        self.timestamps[i] = ts
        self.status[i] = status
        self.reason[i] = reason
        self._pending[i] = row
        self._flush_ready()

    def _flush_block(self, b: int) -> None:
        lo, hi = b * self.block, min(self.n, (b + 1) * self.block)
        rows = [self._pending.pop(j, None) for j in range(lo, hi)]
        data = np.stack([r if r is not None else np.zeros((self.T, *self.step_shape), self.dtype)
                         for r in rows])
        self.features[lo:hi] = data
        self._flushed[lo:hi] = True

    def _flush_ready(self) -> None:
        for b in {j // self.block for j in self._pending}:
            lo, hi = b * self.block, min(self.n, (b + 1) * self.block)
            if all(j in self._pending for j in range(lo, hi)):
                self._flush_block(b)

    def commit(self) -> Path:
        """Flush remaining rows, write metadata arrays and attrs, rename into place."""
        for b in sorted({j // self.block for j in self._pending}):
            self._flush_block(b)
        g = self.group
        for name, values in (("video_id", self.video_ids), ("status", self.status),
                             ("reason", self.reason)):
            a = g.create_array(name, shape=(self.n,), dtype=str, chunks=(max(1, self.n),))
            if self.n:
                a[:] = values
        g.create_array("lengths", data=self.lengths, chunks=(max(1, self.n),))
        g.create_array("timestamps", data=self.timestamps, chunks=(max(1, self.n), max(1, self.T)))
        g.attrs["provenance"] = self.provenance
        if self.out.exists():  # replace an older shard: move it aside first, then swap
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "FeatureShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_feature_shard(
    out: str | Path,
    video_ids: Sequence[str],
    features: Sequence[np.ndarray] | np.ndarray,
    lengths: Sequence[int] | None = None,
    timestamps: Sequence[Sequence[float]] | np.ndarray | None = None,
    status: Sequence[str] | None = None,
    reason: Sequence[str] | None = None,
    dtype: str = "float16",
    provenance: dict | None = None,
    n_steps: int | None = None,
    compression: str | None = None,
) -> Path:
    """Write a whole feature shard atomically.

    ``features``: an (n, T, ...) array or a list of (T_i, ...) arrays (ragged, UnAV).
    ``lengths`` default to each row's T_i (for an array: T); ``timestamps`` default to
    0, 1, 2, ... s; ``status`` to ``ok``. Rows past ``lengths`` are stored as zeros.
    """
    n = len(video_ids)
    if len(features) != n:
        raise ValueError(f"{len(features)} feature rows for {n} video ids")
    rows = [np.asarray(f) for f in features]
    if lengths is None:
        lengths = [r.shape[0] for r in rows]
    step_shape = rows[0].shape[1:] if rows else ()
    T = n_steps if n_steps is not None else max([r.shape[0] for r in rows], default=0)
    with FeatureShardWriter(out, video_ids, T, step_shape, dtype, provenance, compression) as w:
        for i, r in enumerate(rows):
            L = int(lengths[i])
            ts = np.arange(L, dtype=float) if timestamps is None else np.asarray(timestamps[i])[:L]
            st = "ok" if status is None else str(status[i])
            w.write(i, r[:L], ts, st, "" if reason is None else str(reason[i]))
        return w.commit()


# --------------------------------------------------------------------------- reading
@dataclass
class FeatureSet:
    """Features of many videos. ``features`` is lazy (dask); the small arrays are numpy."""

    features: da.Array            # (N, T, ...)
    lengths: np.ndarray           # (N,) int32
    video_ids: np.ndarray         # (N,) str
    status: np.ndarray            # (N,) str
    reason: np.ndarray            # (N,) str
    timestamps: np.ndarray        # (N, T) float64, NaN past length
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def ok(self) -> np.ndarray:
        return self.status == "ok"

    def to_xarray(self):
        """An ``xarray.Dataset`` with dims (video, step, d0, ...), coordinate ``video_id``."""
        import xarray as xr

        fdims = ["video", "step", *[f"d{i}" for i in range(self.features.ndim - 2)]]
        return xr.Dataset(
            {
                "features": (fdims, self.features),
                "lengths": ("video", self.lengths),
                "timestamps": (("video", "step"), self.timestamps),
                "status": ("video", self.status),
                "reason": ("video", self.reason),
            },
            coords={"video_id": ("video", self.video_ids)},
            attrs={"provenance": json.dumps(self.attrs.get("provenance", {}))},
        )


def _is_shard(p: Path) -> bool:
    return (p / "zarr.json").is_file() and (p / "features").is_dir()


def shard_paths(path_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve a shard, a directory of ``*.zarr`` shards, or a list of either."""
    if isinstance(path_or_dir, (list, tuple)):
        return [s for p in path_or_dir for s in shard_paths(p)]
    p = Path(path_or_dir)
    if _is_shard(p):
        return [p]
    if p.is_dir():
        found = sorted(s for s in p.glob("*.zarr") if _is_shard(s))
        if found:
            return found
    raise FileNotFoundError(f"no feature shard at {p} (expected a .zarr group with 'features')")


def _strings(arr) -> np.ndarray:
    # zarr returns numpy StringDType (variable length); plain '<U' arrays are friendlier.
    return np.array([str(x) for x in np.asarray(arr[...]).tolist()], dtype=str)


def _read_shard(p: Path) -> tuple[da.Array, dict[str, np.ndarray], dict]:
    g = zarr.open_group(str(p), mode="r")
    f = g["features"]
    # dask tasks span many videos (a multiple of the chunk): per-task overhead is what
    # dominates a full read, not bytes
    unit = (f.shards or f.chunks)[0]
    row_bytes = int(np.prod(f.shape[1:])) * f.dtype.itemsize
    rows = max(unit, (READ_BLOCK_BYTES // max(1, row_bytes)) // unit * unit)
    feats = da.from_zarr(f, chunks=(min(rows, max(1, f.shape[0])), *f.shape[1:]))
    small = {k: _strings(g[k]) for k in _STR_ARRAYS}
    small["lengths"] = np.asarray(g["lengths"][...], np.int32)
    small["timestamps"] = np.asarray(g["timestamps"][...], np.float64)
    return feats, small, dict(g.attrs)


def open_features(
    path_or_dir: str | Path | Sequence[str | Path],
    video_ids: Sequence[str] | None = None,
    xarray: bool = False,
):
    """Open feature shards lazily, concatenated in shard order.

    Shards with different T (UnAV) are padded to the largest T (zeros; NaN timestamps).
    With ``video_ids`` rows are reordered to that sequence, repeating duplicates (AVE
    samples share videos); an unknown id raises ``KeyError`` naming it.
    With ``xarray=True`` an ``xarray.Dataset`` is returned instead of a ``FeatureSet``.
    """
    paths = shard_paths(path_or_dir)
    parts = [_read_shard(p) for p in paths]
    step_shapes = {tuple(f.shape[2:]) for f, _, _ in parts}
    dtypes = {f.dtype for f, _, _ in parts}
    if len(step_shapes) > 1 or len(dtypes) > 1:
        raise ValueError(f"shards disagree on feature shape/dtype: {step_shapes} {dtypes}")
    T = max(f.shape[1] for f, _, _ in parts)
    feats, ts = [], []
    for f, small, _ in parts:
        pad = T - f.shape[1]
        if pad:
            f = da.pad(f, [(0, 0), (0, pad)] + [(0, 0)] * (f.ndim - 2))
        feats.append(f)
        t = small["timestamps"]
        ts.append(np.pad(t, [(0, 0), (0, pad)], constant_values=np.nan) if pad else t)
    cat = {k: np.concatenate([s[k] for _, s, _ in parts]) for k in ("video_id", "status", "reason", "lengths")}
    fs = FeatureSet(
        features=da.concatenate(feats, axis=0) if len(feats) > 1 else feats[0],
        lengths=cat["lengths"],
        video_ids=cat["video_id"],
        status=cat["status"],
        reason=cat["reason"],
        timestamps=np.concatenate(ts, axis=0),
        attrs={"provenance": parts[0][2].get("provenance", {}), "shards": [str(p) for p in paths]},
    )
    if video_ids is not None:
        fs = reindex(fs, video_ids)
    return fs.to_xarray() if xarray else fs


def reindex(fs: FeatureSet, video_ids: Sequence[str]) -> FeatureSet:
    """Rows of ``fs`` in the order of ``video_ids`` (duplicates repeated)."""
    pos: dict[str, int] = {}
    for i, v in enumerate(fs.video_ids):
        if v in pos:
            raise ValueError(f"video id {v!r} appears in more than one row of the store")
        pos[v] = i
    wanted = [str(v) for v in video_ids]
    missing = [v for v in wanted if v not in pos]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"{len(missing)} video id(s) not in the feature store: {missing[:5]}{more}")
    idx = np.fromiter((pos[v] for v in wanted), dtype=np.int64, count=len(wanted))
    if len(idx) and np.array_equal(idx, np.arange(len(fs))):
        return fs
    return FeatureSet(
        features=fs.features[idx],
        lengths=fs.lengths[idx],
        video_ids=fs.video_ids[idx],
        status=fs.status[idx],
        reason=fs.reason[idx],
        timestamps=fs.timestamps[idx],
        attrs=fs.attrs,
    )


# --------------------------------------------------------------------------- inspect
def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def inspect_store(path: str | Path) -> dict:
    """Summary of a shard or a directory of shards (for ``avepipe inspect``)."""
    paths = shard_paths(path)
    fs = open_features(paths)
    g = zarr.open_group(str(paths[0]), mode="r")
    f = g["features"]
    failed = [
        {"video_id": v, "reason": r}
        for v, s, r in zip(fs.video_ids, fs.status, fs.reason) if s != "ok"
    ]
    nbytes = sum(_du(p) for p in paths)
    return {
        "path": str(path),
        "shards": [str(p) for p in paths],
        "n_videos": len(fs),
        "n_ok": int(fs.ok.sum()),
        "shape": list(fs.features.shape),
        "dtype": str(fs.features.dtype),
        "chunks": list(f.chunks),
        "codec_shards": list(f.shards) if f.shards else None,
        "compressors": [type(c).__name__ for c in f.compressors],
        "lengths": {"min": int(fs.lengths.min()) if len(fs) else 0,
                    "max": int(fs.lengths.max()) if len(fs) else 0},
        "bytes_on_disk": nbytes,
        "bytes_per_video": nbytes / max(1, len(fs)),
        "provenance": fs.attrs.get("provenance", {}),
        "failed": failed,
    }


def format_inspect(info: dict) -> str:
    """Human-readable text of ``inspect_store`` output."""
    prov = info.get("provenance", {})
    weights = prov.get("weights", {}) or {}
    lines = [
        f"store        {info['path']}  ({len(info['shards'])} shard(s))",
        f"videos       {info['n_videos']} ({info['n_ok']} ok, {len(info['failed'])} failed)",
        f"features     shape {tuple(info['shape'])}  dtype {info['dtype']}",
        f"chunks       {tuple(info['chunks'])}"
        + (f"  codec shards {tuple(info['codec_shards'])}" if info["codec_shards"] else ""),
        f"lengths      {info['lengths']['min']}..{info['lengths']['max']}",
        f"disk         {info['bytes_on_disk'] / 1e6:.2f} MB ({info['bytes_per_video'] / 1e3:.1f} kB/video)",
    ]
    if prov:
        lines += [
            f"encoder      {prov.get('encoder', '?')}  weights {weights.get('id', '?')}"
            f"  sha256 {str(weights.get('sha256', '?'))[:12]}",
            f"stage        {prov.get('stage', '?')}  created {prov.get('created', '?')}"
            f"  code {str(prov.get('code_fingerprint', '?'))[:12]}",
        ]
        for key in ("frames_per_segment", "sample_rate", "window", "hop", "dtype", "source"):
            if prov.get(key) is not None:
                lines.append(f"{key:<12} {prov[key]}")
    for item in info["failed"][:20]:
        lines.append(f"  failed {item['video_id']}: {item['reason']}")
    if len(info["failed"]) > 20:
        lines.append(f"  ... {len(info['failed']) - 20} more failed")
    return "\n".join(lines)
