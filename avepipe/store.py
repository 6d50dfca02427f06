"""Feature stores: one Zarr v3 group per shard, every chunk checksummed; direct or lazy reads.

Layout (docs/contracts.md "Feature shard")::

    features   (n, T, ...)  float16 (visual maps, default) | float32; ~8 MiB chunks of whole videos
    video_id   (n,) str     lengths (n,) int32     timestamps (n, T) float64 (NaN past length)
    status     (n,) str     reason  (n,) str       attrs: provenance

Every array ends its codecs with crc32c and every chunk is written, zeros included, so a
missing, truncated or altered chunk is found (avepipe.verify): ``open_features`` stats every
chunk file (cheap) and every read checks the checksum of each chunk it reads; damage raises
``StoreDamagedError`` naming store, array, chunk and file. Dimension names (video, step,
height, width, channel) and consolidated metadata let ``xarray.open_zarr(shard)`` open a
shard as it is.

A shard is written into ``<out>.tmp-<pid>`` and renamed when complete, so a shard that
exists is whole; a writer first removes the temporaries of dead processes. Chunks hold as
many whole videos as fit in ~8 MiB: zarr pays a fixed cost per chunk, so one-video chunks
made a full read 4-7x slower than the legacy h5, and small audio rows would be thousands
of tiny files.

Reading: ``FeatureSet.read(rows)`` and ``read_features`` read the chunk files straight into
one preallocated array (one copy from the page cache, CRC-32C checked on the way, chunks in
parallel threads): the fast path (benchmarks/store.py). ``FeatureSet.features`` is the same
reader behind dask, for lazy and out-of-core work.

Why one long module: the on-disk layout, its writer and its readers (direct chunk reads,
dask, xarray) must change together; a chunking or codec change touches all of them.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from avepipe.verify import (FEATURE_ARRAYS, ArrayInfo, Problem, StoreDamagedError, check_present, checksum_problem,
                            file_problem, has_checksum, layout_problems, raw_chunk_nbytes, read_array, read_metadata)

if TYPE_CHECKING:  # dask is imported where it is used: decode, frames and extract never need it
    import dask.array as da

log = logging.getLogger(__name__)

CHUNK_TARGET_BYTES = 8 << 20  # whole videos per chunk, up to ~8 MiB (one file each)
READ_BLOCK_BYTES = 256 << 20  # dask task size when reading: one task per ~256 MiB of rows
# chunk files read in parallel by FeatureSet.read: file reads release the GIL, and on a cold
# page cache more requests in flight keep the disk busy (benchmarks/store.py: 4 threads read
# a cold AVE set a little faster than 2 on 2 cores)
READ_THREADS = max(4, min(8, os.cpu_count() or 1))
# rows at least this big are read straight into their place; smaller ones (audio vectors)
# would cost a read call each, so their chunk is read whole and copied out in one go
DIRECT_ROW_BYTES = 64 << 10
# zarr's default of 10 concurrent chunk reads costs more than it gains on a local disk with
# few cores (benchmarks/store.py); ZARR_ASYNC__CONCURRENCY overrides. Only reads that
# go through zarr use it (metadata arrays, compressed stores, xarray.open_zarr).
if "ZARR_ASYNC__CONCURRENCY" not in os.environ:
    zarr.config.set({"async.concurrency": 2})
# Features are stored uncompressed by default: on the benchmark zstd/blosc decoding made a
# full read 2-3x slower while saving ~40% on synthetic maps; float16 already halves the
# legacy float32 h5. "zstd" / "blosc-lz4" are options for archives.
COMPRESSION = {
    None: None,
    "zstd": lambda: zarr.codecs.ZstdCodec(level=3),
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}
# every chunk written, even all zeros: a missing chunk file is then damage, not fill value
ARRAY_CONFIG = {"write_empty_chunks": True}
WRITER_MARK = "avepipe-writer.json"  # host and pid of the writer, inside a temporary store
_STR_ARRAYS = ("video_id", "status", "reason")


def codecs(compression: str | None = None) -> list:
    """Bytes-to-bytes codecs of an avepipe array: the optional compressor, then crc32c (the
    checksum covers the bytes on disk, so damage is caught before decompression)."""
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {list(COMPRESSION)}, got {compression!r}")
    return [*([COMPRESSION[compression]()] if compression else []), Crc32cCodec()]


def feature_dims(ndim: int) -> list[str]:
    """Dimension names of a features array: (video, step, height, width, channel) for maps,
    (video, step, channel) for vectors."""
    rest = {1: ["channel"], 3: ["height", "width", "channel"]}.get(ndim - 2)
    return ["video", "step", *(rest or [f"d{i}" for i in range(ndim - 2)])]


# --------------------------------------------------------------------------- temporaries
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_writer(tmp: Path) -> None:
    """Record host and pid inside a temporary store (removed again before the rename)."""
    (tmp / WRITER_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def unmark_writer(tmp: Path) -> None:
    (tmp / WRITER_MARK).unlink(missing_ok=True)


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove ``<out>.tmp-<pid>`` (and ``<out>.old-<pid>``) siblings left by writers that
    are no longer running; returns what was removed (each logged).

    Never removes one whose process is alive, nor one written on another host (a shared
    file system: its pid cannot be checked from here; that is logged). One of this very
    process is a leftover of an earlier, failed write and is removed.
    """
    out = Path(out)
    removed = []
    here = socket.gethostname()
    found = [*out.parent.glob(f"{glob.escape(out.name)}.tmp-*"), *out.parent.glob(f"{glob.escape(out.name)}.old-*")]
    for tmp in sorted(found):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            host = json.loads((tmp / WRITER_MARK).read_text()).get("host")
        except (OSError, ValueError, AttributeError):
            host = None  # no mark: a finished (renamed-aside) store or an older writer
        if host not in (None, here):
            log.warning("leaving %s alone: written by process %s on host %s (remove it by hand "
                        "if no job runs there)", tmp, pid, host)
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            log.warning("leaving %s alone: process %s is still running", tmp, pid)
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        log.warning("removed stale temporary %s (process %s is not running)", tmp, pid)
        removed.append(tmp)
    return removed


def finish_store(tmp: Path, out: Path) -> Path:
    """Consolidate metadata, drop the writer mark and rename ``tmp`` to ``out`` (replacing
    an older store: moved aside first, then swapped, so ``out`` is never half written)."""
    unmark_writer(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec yet
        zarr.consolidate_metadata(str(tmp))
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- writing
def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_TARGET_BYTES // max(1, row_bytes))


def _small_array(group: zarr.Group, name: str, values: np.ndarray, dims: list[str]) -> zarr.Array:
    """One-chunk array (checksummed, written even when all fill value)."""
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "UOT" else values.dtype
    a = group.create_array(name, shape=values.shape, dtype=dtype, chunks=tuple(max(1, s) for s in values.shape),
                           compressors=codecs(), config=ARRAY_CONFIG, dimension_names=dims)
    if values.size:
        a[...] = values
    return a


class FeatureShardWriter:
    """Incremental writer of one feature shard (rows may arrive one video at a time).

    ``write(i, ...)`` buffers rows and writes each chunk once, when all its rows are
    in; ``commit()`` writes every chunk not yet written (rows never given are zeros,
    status "failed", reason "not written"), the small arrays and attrs, and renames the
    temporary directory to ``out``. Starting a writer removes stale temporaries of
    ``out`` (``remove_stale_temporaries``). Used as a context manager, an exception
    removes the temporary directory and leaves no partial store behind.
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
        compressors = codecs(compression)  # checks the name first
        self.out = Path(out)
        self.n = len(video_ids)
        self.T = int(n_steps)
        self.step_shape = tuple(int(s) for s in step_shape)
        self.dtype = np.dtype(dtype)
        self.provenance = provenance or {}
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)  # this process's own leftover included
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        mark_writer(self.tmp)

        row_bytes = int(np.prod((self.T, *self.step_shape))) * self.dtype.itemsize
        self.block = min(max(1, self.n), _rows_per_chunk(row_bytes))
        shape = (self.n, self.T, *self.step_shape)
        # rows are buffered and written a whole chunk at a time (each chunk file written once)
        self.features = self.group.create_array(
            "features", shape=shape, chunks=(self.block, self.T, *self.step_shape), dtype=self.dtype,
            fill_value=0, dimension_names=feature_dims(len(shape)), compressors=compressors,
            config=ARRAY_CONFIG, attributes={"coordinates": "video_id"},  # xarray: video_id is a coordinate
        )
        self.lengths = np.zeros(self.n, np.int32)
        self.timestamps = np.full((self.n, self.T), np.nan)
        self.status = np.array(["failed"] * self.n, dtype=object)
        self.reason = np.array(["not written"] * self.n, dtype=object)
        self.video_ids = np.array([str(v) for v in video_ids], dtype=object)
        self._pending: dict[int, np.ndarray] = {}
        self._written = np.zeros(math.ceil(self.n / self.block), bool)  # per chunk

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
        self._written[b] = True

    def _flush_ready(self) -> None:
        for b in {j // self.block for j in self._pending}:
            lo, hi = b * self.block, min(self.n, (b + 1) * self.block)
            if all(j in self._pending for j in range(lo, hi)):
                self._flush_block(b)

    def commit(self) -> Path:
        """Write every chunk not yet written, the small arrays and attrs; rename into place."""
        for b in np.flatnonzero(~self._written):
            self._flush_block(int(b))
        g = self.group
        for name, values in (("video_id", self.video_ids), ("status", self.status),
                             ("reason", self.reason)):
            _small_array(g, name, values.astype(str), ["video"])
        _small_array(g, "lengths", self.lengths, ["video"])
        _small_array(g, "timestamps", self.timestamps, ["video", "step"])
        g.attrs["provenance"] = self.provenance
        return finish_store(self.tmp, self.out)

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
class _ShardReader:
    """Reads rows of one shard's ``features`` into a caller's array, checking each chunk.

    When a chunk file is exactly its raw bytes plus the crc32c (the uncompressed default,
    chunks of whole videos, a little-endian machine), wanted rows are read straight into
    their place in the output (other rows into a scratch buffer, for the checksum), so a
    full read is one copy from the page cache. Anything else is read through zarr, whose
    codec checks the checksum.
    """

    def __init__(self, path: Path, arr: ArrayInfo) -> None:
        self.path, self.arr = path, arr
        self.key = arr.metadata.encode_chunk_key
        self.ndim = arr.ndim
        self.n, self.T = int(arr.shape[0]), int(arr.shape[1])
        self.step_shape = tuple(int(s) for s in arr.shape[2:])
        self.dtype = arr.dtype
        self.rows = int(arr.chunks[0])  # rows per chunk
        self.row_nbytes = math.prod(arr.shape[1:]) * arr.dtype.itemsize
        whole_rows = tuple(arr.chunks[1:]) == tuple(arr.shape[1:]) and sys.byteorder == "little"
        self.raw = raw_chunk_nbytes(arr) if whole_rows else None

    def __getstate__(self) -> dict:  # picklable for dask's process schedulers
        return {k: v for k, v in self.__dict__.items() if k != "key"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.key = self.arr.metadata.encode_chunk_key

    def chunk_file(self, c: int) -> Path:
        return self.path / "features" / self.key((c,) + (0,) * (self.ndim - 1))

    def jobs(self, src: np.ndarray, dest: np.ndarray) -> list[tuple]:
        """One (reader, chunk, src rows, dest rows) per chunk touched, src ascending."""
        order = np.argsort(src, kind="stable")
        src, dest = src[order], dest[order]
        chunk = src // self.rows
        cuts = np.flatnonzero(np.diff(chunk)) + 1
        return [(self, int(s[0] // self.rows), s, d) for s, d in zip(np.split(src, cuts), np.split(dest, cuts))
                if len(s)]

    def read_chunk(self, c: int, src: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
        """Rows ``src`` of chunk ``c`` into ``out[dest, :T]`` (the chunk's checksum checked)."""
        if self.raw is None:
            lo, hi = c * self.rows, min(self.n, (c + 1) * self.rows)
            block = read_array(self.path, "features", self.arr, slice(lo, hi))
            out[dest, : self.T] = block[src - lo]
            return
        if self.row_nbytes < DIRECT_ROW_BYTES:
            return self._read_chunk_scatter(c, src, dest, out)
        first: dict[int, int] = {}
        dups = []
        for r, d in zip((src - c * self.rows).tolist(), dest.tolist()):
            if r in first:
                dups.append((d, first[r]))
            else:
                first[r] = d
        whole = out.shape[1] == self.T
        segments, r, rows = [], 0, self.rows
        while r < rows:  # the chunk file in order: runs of rows into out, the rest into scratch
            d = first.get(r)
            k = r + 1
            if d is None:
                while k < rows and k not in first:
                    k += 1
                segments.append(_scratch(self.raw)[r * self.row_nbytes:k * self.row_nbytes])
            elif whole:
                while k < rows and first.get(k) == d + k - r:
                    k += 1
                segments.append(out[d:d + k - r].reshape(-1).view(np.uint8))
            else:  # a shorter shard padded to the set's T: its rows are the first T steps
                segments.append(out[d, : self.T].reshape(-1).view(np.uint8))
            r = k
        self._read_checked(c, segments)
        for d, d0 in dups:
            out[d] = out[d0]

    def _read_chunk_scatter(self, c: int, src: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
        """Small rows: the whole chunk into scratch (one read), then one vectorised copy out."""
        scratch = _scratch(self.raw)
        self._read_checked(c, [scratch])
        rows = scratch.view(self.dtype).reshape(self.rows, self.T, *self.step_shape)
        out[dest, : self.T] = rows[src - c * self.rows]

    def _read_checked(self, c: int, segments: list[np.ndarray]) -> None:
        """Fill ``segments`` (uint8 views, together the chunk's bytes in file order) from the
        chunk file of chunk ``c`` and check size and crc32c; StoreDamagedError if not."""
        stored = np.empty(4, np.uint8)
        path = self.chunk_file(c)
        coords = (c,) + (0,) * (self.ndim - 1)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise StoreDamagedError([file_problem(self.path, "features", coords, path, None, None)]) from None
        with f:
            problem = file_problem(self.path, "features", coords, path, os.fstat(f.fileno()).st_size, self.raw + 4)
            if problem is None:
                for seg in (*segments, stored):
                    got = 0
                    while got < seg.nbytes:
                        n = f.readinto(seg[got:])
                        if not n:
                            break
                        got += n
                    if got < seg.nbytes:  # shrank since the stat
                        problem = file_problem(self.path, "features", coords, path, f.tell(), self.raw + 4)
                        break
        if problem is None:
            crc = 0
            for seg in segments:
                crc = google_crc32c.extend(crc, seg)
            problem = checksum_problem(self.path, "features", coords, path, stored.tobytes(), crc)
        if problem is not None:
            raise StoreDamagedError([problem])



_SCRATCH = threading.local()  # one reusable buffer per thread (a chunk's unwanted rows)


def _scratch(nbytes: int) -> np.ndarray:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _SCRATCH.buf = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


def _run_jobs(jobs: list[tuple], out: np.ndarray, threads: int) -> None:
    """Read every chunk job into ``out``; all damaged chunks are reported together."""
    problems: list[Problem] = []

    def one(job) -> None:
        reader, c, src, dest = job
        try:
            reader.read_chunk(c, src, dest, out)
        except StoreDamagedError as exc:
            problems.extend(exc.problems)

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="avepipe-read") as pool:
            list(pool.map(one, jobs))
    else:
        for job in jobs:
            one(job)
    if problems:
        raise StoreDamagedError(sorted(problems, key=lambda p: (p.store, p.chunk or ())))


class _Rows:
    """The rows of a FeatureSet as (shard, row in shard): what ``FeatureSet.read`` reads."""

    def __init__(self, shards: list[_ShardReader], shard_of: np.ndarray, row_of: np.ndarray, T: int) -> None:
        self.shards, self.shard_of, self.row_of, self.T = shards, shard_of, row_of, T
        self.dtype = shards[0].dtype
        self.shape = (len(shard_of), T, *shards[0].step_shape)
        self.ndim = len(self.shape)

    def take(self, idx: np.ndarray) -> "_Rows":
        return _Rows(self.shards, self.shard_of[idx], self.row_of[idx], self.T)

    def read(self, rows=None, threads: int | None = None) -> np.ndarray:
        rows = np.arange(self.shape[0]) if rows is None else np.arange(self.shape[0])[rows]
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        shard_of, row_of = self.shard_of[rows], self.row_of[rows]
        jobs = []
        for s, reader in enumerate(self.shards):
            dest = np.flatnonzero(shard_of == s)
            if len(dest):
                if reader.T < self.T:
                    out[dest, reader.T:] = 0
                jobs += reader.jobs(row_of[dest], dest)
        _run_jobs(jobs, out, READ_THREADS if threads is None else threads)
        return out

    def getitem(self, key, threads: int | None = None) -> np.ndarray:
        """Basic indexing (what dask's from_array and xarray ask for): rows read, rest sliced."""
        key = key if isinstance(key, tuple) else (key,)
        rows = np.arange(self.shape[0])[key[0]]
        data = self.read(rows, threads=threads)
        return data[0][key[1:]] if np.ndim(rows) == 0 else data[(slice(None), *key[1:])]

    def __getitem__(self, key) -> np.ndarray:
        return self.getitem(key, threads=1)  # dask's tasks run in parallel already

    def dask(self) -> "da.Array":
        """Dask array of these rows. Tasks read whole chunks of one shard, ~READ_BLOCK_BYTES
        each, in store order; other orders are a dask take of that (reading in the wanted
        order would read every chunk once per task)."""
        import dask.array as da

        offsets = np.cumsum([0] + [r.n for r in self.shards])
        where = offsets[self.shard_of] + self.row_of  # row in the concatenated store order
        everything = _Rows(self.shards, np.repeat(np.arange(len(self.shards)), [r.n for r in self.shards]),
                           np.concatenate([np.arange(r.n) for r in self.shards]), self.T)
        blocks = []
        for reader in self.shards:
            step = max(reader.rows, (READ_BLOCK_BYTES // max(1, reader.row_nbytes)) // reader.rows * reader.rows)
            blocks += [min(step, reader.n - lo) for lo in range(0, reader.n, step)]
        chunks = (tuple(blocks) or (0,), *[(d,) for d in self.shape[1:]])
        name = f"avepipe-features-{uuid.uuid4().hex}"
        if np.array_equal(where, np.arange(offsets[-1])):
            return da.from_array(everything, chunks=chunks, name=name, asarray=False, fancy=False,
                                 meta=np.empty((0,) * self.ndim, self.dtype))
        return self._gathered()

    def _gathered(self) -> "da.Array":
        """Rows in any order: one task per shard reads the rows needed from it (each chunk
        once), one task per output block of ~READ_BLOCK_BYTES gathers its rows from those.
        (dask's own take over store-order blocks makes many small tasks: several times slower.)"""
        import dask
        import dask.array as da

        parts, where = {}, {}
        for s, reader in enumerate(self.shards):
            mine = np.flatnonzero(self.shard_of == s)
            if len(mine):
                need, pos = np.unique(self.row_of[mine], return_inverse=True)
                parts[s] = dask.delayed(_read_shard_rows, pure=False)(self.shards, s, need, self.T)
                where[s] = (mine, pos.reshape(-1))
        row_nbytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        step = max(1, READ_BLOCK_BYTES // max(1, row_nbytes))
        blocks = []
        for lo in range(0, self.shape[0], step):
            hi = min(self.shape[0], lo + step)
            dest, src, deps = [], [], []
            for s, (mine, pos) in where.items():
                sel = (mine >= lo) & (mine < hi)
                if sel.any():
                    dest.append(mine[sel] - lo)
                    src.append(pos[sel])
                    deps.append(parts[s])
            task = dask.delayed(_gather, pure=False)((hi - lo, *self.shape[1:]), self.dtype, dest, src, deps)
            blocks.append(da.from_delayed(task, shape=(hi - lo, *self.shape[1:]), dtype=self.dtype))
        if not blocks:
            return da.zeros(self.shape, self.dtype)
        return blocks[0] if len(blocks) == 1 else da.concatenate(blocks)


def _read_shard_rows(shards: list[_ShardReader], s: int, rows: np.ndarray, T: int) -> np.ndarray:
    """Rows ``rows`` (ascending) of shard ``s``, padded to ``T`` steps (a dask task)."""
    return _Rows(shards, np.full(len(rows), s), rows, T).read(threads=1)


def _gather(shape: tuple, dtype, dest: list, src: list, parts: list) -> np.ndarray:
    out = np.empty(shape, dtype)
    for d, p, a in zip(dest, src, parts):
        out[d] = a[p]
    return out


class FeatureSet:
    """Features of many videos and their small per-video arrays (numpy).

    ``features`` (N, T, ...) is lazy (dask; built on first use) or, from ``read_features``,
    numpy; ``read(rows)`` reads rows into one new numpy array (the fast path).
    ``lengths`` (N,) int32, ``video_ids`` / ``status`` / ``reason`` (N,) str,
    ``timestamps`` (N, T) float64 (NaN past length), ``attrs`` (provenance, shards).
    """

    def __init__(self, features: da.Array | np.ndarray | None, lengths: np.ndarray, video_ids: np.ndarray,
                 status: np.ndarray, reason: np.ndarray, timestamps: np.ndarray, attrs: dict | None = None,
                 source: _Rows | None = None) -> None:
        if features is None and source is None:
            raise ValueError("FeatureSet needs features or a source to read them from")
        self._features = features
        self.lengths, self.video_ids, self.status, self.reason = lengths, video_ids, status, reason
        self.timestamps = timestamps
        self.attrs = attrs if attrs is not None else {}
        self.source = source

    @property
    def features(self) -> da.Array | np.ndarray:
        if self._features is None:  # built on demand: the graph of a reordered set is not free
            self._features = self.source.dask()
        return self._features

    @features.setter
    def features(self, value) -> None:
        self._features = value

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def shape(self) -> tuple:
        """(N, T, ...) of the features, without reading or building anything."""
        return tuple(self.source.shape if self._features is None else self._features.shape)

    def __repr__(self) -> str:
        shape = self.source.shape if self._features is None else self._features.shape
        return f"FeatureSet({len(self)} videos, features {tuple(shape)}, shards {self.attrs.get('shards')})"

    @property
    def ok(self) -> np.ndarray:
        return self.status == "ok"

    def take(self, idx) -> "FeatureSet":
        """The rows ``idx`` (ints, mask or slice) as a new FeatureSet (nothing read)."""
        idx = np.arange(len(self))[idx]
        return FeatureSet(
            features=None if self.source is not None else self.features[idx],
            lengths=self.lengths[idx], video_ids=self.video_ids[idx], status=self.status[idx],
            reason=self.reason[idx], timestamps=self.timestamps[idx], attrs=self.attrs,
            source=None if self.source is None else self.source.take(idx),
        )

    def read(self, rows=None) -> np.ndarray:
        """Features of ``rows`` (ints, a bool mask or a slice; None: all) as one C-contiguous
        array, in that order. From a store: chunk files read straight into the result in
        parallel, every chunk read checked against its checksum (``StoreDamagedError``)."""
        if self.source is not None:
            return self.source.read(rows)
        sel = self.features if rows is None else self.features[rows]
        return np.ascontiguousarray(sel.compute() if hasattr(sel, "compute") else sel)

    def to_xarray(self):
        """An ``xarray.Dataset`` with dims (video, step, ...) as ``feature_dims``, coordinate
        ``video_id``; features lazy (read on access through ``read``)."""
        import xarray as xr

        if self.source is not None:
            from xarray.core import indexing

            data = indexing.LazilyIndexedArray(_XarrayRows(self.source))
        else:
            data = self.features
        fdims = feature_dims(len(data.shape))
        return xr.Dataset(
            {
                "features": xr.Variable(fdims, data),
                "lengths": ("video", self.lengths),
                "timestamps": (("video", "step"), self.timestamps),
                "status": ("video", self.status),
                "reason": ("video", self.reason),
            },
            coords={"video_id": ("video", self.video_ids)},
            attrs={"provenance": json.dumps(self.attrs.get("provenance", {}))},
        )


def _xarray_rows_class():
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class XarrayRows(BackendArray):
        """xarray's lazy-array protocol over ``_Rows`` (basic indexing)."""

        def __init__(self, rows: _Rows) -> None:
            self.rows, self.shape, self.dtype = rows, rows.shape, rows.dtype

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                      self.rows.getitem)

    return XarrayRows


def _XarrayRows(rows: _Rows):  # noqa: N802 - xarray is imported only when used
    return _xarray_rows_class()(rows)


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
    return np.array([str(x) for x in np.asarray(arr).tolist()], dtype=str)


def _open_shard(p: Path) -> tuple[_ShardReader, dict[str, np.ndarray], dict]:
    """Open one shard after the cheap checks (metadata, layout, every chunk file present and
    of the right size); its small arrays are read (checksums checked by the codec)."""
    attrs, arrays = read_metadata(p)
    arrays = {k: a for k, a in arrays.items() if k in FEATURE_ARRAYS}
    problems = layout_problems(p, arrays)
    if "features" not in arrays:
        problems.insert(0, Problem(str(p), "features", None, "missing", "array missing"))
    problems = problems or check_present(p, arrays)
    if problems:
        raise StoreDamagedError(problems)
    small = {k: _strings(read_array(p, k, arrays[k])) for k in _STR_ARRAYS}
    small["lengths"] = np.asarray(read_array(p, "lengths", arrays["lengths"]), np.int32)
    small["timestamps"] = np.asarray(read_array(p, "timestamps", arrays["timestamps"]), np.float64)
    return _ShardReader(p, arrays["features"]), small, attrs


def open_features(
    path_or_dir: str | Path | Sequence[str | Path],
    video_ids: Sequence[str] | None = None,
    xarray: bool = False,
):
    """Open feature shards, concatenated in shard order (features lazy: nothing big is read).

    Every chunk file of every shard is checked to exist with the right size first (a stat
    each), and every later read checks each chunk's checksum: a damaged store raises
    ``StoreDamagedError`` (one line per problem, as ``avepipe verify`` prints them).
    Shards with different T (UnAV) are padded to the largest T (zeros; NaN timestamps).
    With ``video_ids`` rows are reordered to that sequence, repeating duplicates (AVE
    samples share videos); an unknown id raises ``KeyError`` naming it.
    With ``xarray=True`` an ``xarray.Dataset`` is returned instead of a ``FeatureSet``.
    """
    paths = shard_paths(path_or_dir)
    parts = [_open_shard(p) for p in paths]
    step_shapes = {r.step_shape for r, _, _ in parts}
    dtypes = {r.dtype for r, _, _ in parts}
    if len(step_shapes) > 1 or len(dtypes) > 1:
        raise ValueError(f"shards disagree on feature shape/dtype: {step_shapes} {dtypes}")
    T = max(r.T for r, _, _ in parts)
    ts = []
    for r, small, _ in parts:
        pad = T - r.T
        t = small["timestamps"]
        ts.append(np.pad(t, [(0, 0), (0, pad)], constant_values=np.nan) if pad else t)
    cat = {k: np.concatenate([s[k] for _, s, _ in parts]) for k in ("video_id", "status", "reason", "lengths")}
    shards = [r for r, _, _ in parts]
    rows = _Rows(shards, np.repeat(np.arange(len(shards)), [r.n for r in shards]),
                 np.concatenate([np.arange(r.n) for r in shards]), T)
    fs = FeatureSet(
        features=None,  # rows.dask() on first use
        lengths=cat["lengths"],
        video_ids=cat["video_id"],
        status=cat["status"],
        reason=cat["reason"],
        timestamps=np.concatenate(ts, axis=0),
        attrs={"provenance": parts[0][2].get("provenance", {}), "shards": [str(p) for p in paths]},
        source=rows,
    )
    if video_ids is not None:
        fs = reindex(fs, video_ids)
    return fs.to_xarray() if xarray else fs


def read_features(path_or_dir: str | Path | Sequence[str | Path], video_ids: Sequence[str] | None = None,
                  rows=None) -> FeatureSet:
    """``open_features(path_or_dir, video_ids)`` with the features read into one numpy array
    (``FeatureSet.read``; ``rows`` selects rows of that set): the fast whole-set load."""
    fs = open_features(path_or_dir, video_ids=video_ids)
    if rows is not None:
        fs = fs.take(rows)
    fs.features = fs.read()
    return fs


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
    return fs.take(idx)


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
        "compressors": [type(c).__name__ for c in f.compressors if not isinstance(c, Crc32cCodec)],
        "checksums": has_checksum(f),
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
        f"checksums    {'crc32c on every chunk' if info.get('checksums') else 'none (written before checksums)'}",
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
