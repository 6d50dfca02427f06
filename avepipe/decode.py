"""Decode stage: one shard of the sample index -> ``decoded/shard-XXX.zarr``.

Layout (docs/contracts.md, "Decoded shard"): one entry per unique ``video_id``,
sorted; arrays ``video_id``, ``status``, ``reason``, ``warnings``, ``n_segments``,
``audio_<rate>`` (n, max_segments*rate) float32 mono and ``frames``
(n, max_segments, K, 224, 224, 3) uint8, one chunk per video; attrs ``probe``,
``provenance``, ``resampler``.

Policy for imperfect media (each adjustment leaves a warning, the video stays ok):

* Segments: ``n_segments`` fixed (AVE: 10) or, when None, the whole seconds of the
  annotated duration (``duration`` column; the probed duration, with a warning, if
  that is missing); the trailing part-second is dropped without a warning. The
  annotation compared against below is ``n_segments`` s (fixed) or ``duration``.
* Shorter than the annotation (by more than ``TOLERANCE_S``): audio is zero-padded,
  the last frame is repeated for frame times past the end.
* Longer than the annotation (by more than ``TOLERANCE_S``): audio and frames are
  trimmed to ``n_segments`` s.
* Silent audio (peak below -80 dBFS): kept, warned.
* Odd sizes, portrait, yuv444p, variable frame rate, any sample rate or channel
  count: handled (frames chosen by presentation time, resized to 224x224 without
  crop; audio mixed to mono by the mean of its channels, resampled with soxr HQ).
* Missing file, unreadable container (random bytes, truncated mp4), no audio stream,
  no video stream, nothing decodable: status ``failed`` with the reason, its rows
  stay zero, and the run goes on (``on_error="fail"`` raises instead).

K frames per second (``sample_frames_per_segment``) are drawn at seeded random
times, one in each of K equal sub-intervals of the second; the seed is derived
from ``seed`` and the video id (sha1), so reruns and other machines agree.

Every array ends its codecs with crc32c and every row is written (zeros for failed
videos), so a missing, truncated or altered chunk is found (avepipe.verify);
``open_decoded`` checks that every chunk file is there before a reader uses the shard.
The store is built in ``<out>.tmp-<pid>`` and renamed when complete, so a shard
that exists is whole; temporary directories of dead runs are removed (and logged).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from avepipe import media
from avepipe.progress import Progress
from avepipe.provenance import provenance
from avepipe.store import ARRAY_CONFIG, codecs, finish_store, mark_writer, remove_stale_temporaries
from avepipe.verify import open_checked, read_checked

log = logging.getLogger(__name__)

FRAME_SIZE = (224, 224)        # (height, width) of the stored frame samples
TOLERANCE_S = 0.1              # length mismatch below this is not worth a warning
SILENCE_PEAK = 1e-4            # -80 dBFS
# Blosc-lz4: ~4x faster to write than zstd-3 at similar size here (float audio barely
# compresses; byte-shuffle helps it a little, ~0.8), so the store is not the bottleneck.
# crc32c last: the checksum covers the bytes on disk (avepipe.verify).
AUDIO_COMPRESSORS = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
FRAME_COMPRESSORS = [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()]
FRAME_DIMS = ["video", "second", "frame", "height", "width", "rgb"]
STATUS_ARRAYS = ("video_id", "status", "reason", "warnings", "n_segments")
PROBE_KEYS = ("duration", "fps", "width", "height", "pix_fmt", "audio_rate", "audio_channels",
              "has_audio", "has_video", "n_frames_est")
# Probe facts copied into the manifest (``duration`` renamed to ``probe_duration``).
MANIFEST_PROBE = {"duration": "probe_duration", "fps": "fps", "width": "width", "height": "height",
                  "audio_rate": "audio_rate", "audio_channels": "audio_channels"}


def _video_seed(seed: int, video_id: str) -> np.random.Generator:
    digest = hashlib.sha1(video_id.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def sample_times(n_segments: int, per_segment: int, rng: np.random.Generator) -> np.ndarray:
    """Random times, one in each of ``per_segment`` equal parts of every second (segment-major)."""
    k = np.arange(n_segments, dtype=np.float64)[:, None]
    j = np.arange(per_segment, dtype=np.float64)[None, :]
    u = rng.random((n_segments, per_segment))
    return (k + (j + u) / per_segment).reshape(-1)


def _clean_json(value):
    """NaN -> None and numpy scalars -> Python, so attrs are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _clean_json(value.item())
    return value


def _annotated(rows: pd.DataFrame) -> float:
    if "duration" not in rows:
        return float("nan")
    d = pd.to_numeric(rows["duration"], errors="coerce").max()
    return float(d) if pd.notna(d) and d > 0 else float("nan")


def _plan(video_id: str, rows: pd.DataFrame, n_segments: int | None) -> dict:
    """Probe one video and decide how many segments it gets (0 when it failed)."""
    path = str(rows["path"].iloc[0])
    item = {"video_id": video_id, "path": path, "status": "ok", "reason": "", "warnings": [],
            "probe": {}, "n_segments": 0, "span": float("nan")}
    listed = bool(rows["exists"].iloc[0]) if "exists" in rows else True
    try:
        if not listed or not Path(path).is_file():
            raise media.MediaError(path, "file missing")
        item["probe"] = media.probe(path)
        for stream in ("video", "audio"):
            if not item["probe"][f"has_{stream}"]:
                raise media.MediaError(path, f"no {stream} stream")
    except media.MediaError as exc:
        item.update(status="failed", reason=exc.reason)
        return item
    if n_segments is not None:
        item["n_segments"], item["span"] = int(n_segments), float(n_segments)
    else:
        span = _annotated(rows)
        if not math.isfinite(span):
            span = item["probe"]["duration"]
            item["warnings"].append(f"no annotated duration: using the probed {span:.2f} s")
        item["span"] = span
        item["n_segments"] = max(1, int(math.floor(span + 1e-6)))
    return item


def _decode_one(item: dict, audio_rates: list[int], k: int, seed: int, threads: int = 0) -> tuple[np.ndarray, dict]:
    n = item["n_segments"]
    times = sample_times(n, k, _video_seed(seed, item["video_id"]))
    dec = media.read_media(item["path"], times=times, size=FRAME_SIZE, rates=audio_rates, threads=threads)
    span, warn = item["span"], item["warnings"]
    if dec.video_end is not None and dec.video_end < span - TOLERANCE_S:
        warn.append(f"video shorter than annotation ({dec.video_end:.2f} s < {span:.2f} s): "
                    "last frame repeated")
    if dec.audio_duration < span - TOLERANCE_S:
        warn.append(f"audio shorter than annotation ({dec.audio_duration:.2f} s < {span:.2f} s): "
                    "zero-padded")
    longest = max(dec.video_end or 0.0, dec.audio_duration)
    if longest > span + TOLERANCE_S:
        warn.append(f"longer than annotation ({longest:.2f} s > {span:.2f} s): trimmed to {n} s")
    if dec.audio_peak < SILENCE_PEAK:
        warn.append("audio is silent (peak below -80 dBFS)")
    audio = {}
    for rate in audio_rates:
        a = dec.audio[rate][: n * rate]
        audio[rate] = np.pad(a, (0, n * rate - len(a)))
    frames = dec.frames.reshape((n, k) + dec.frames.shape[1:])
    return frames, audio


def _write_row(frames_arr: zarr.Array, audio_arrays: dict, i: int, frames: np.ndarray,
               audio: dict[int, np.ndarray]) -> None:
    """Store video ``i`` as whole chunks (zero past its own n_segments)."""
    if frames_arr.shape[2]:  # k = 0: no frame sample stored
        block = np.zeros(frames_arr.shape[1:], np.uint8)
        block[: len(frames)] = frames
        frames_arr[i] = block
    for rate, arr in audio_arrays.items():
        row = np.zeros(arr.shape[1], np.float32)
        row[: len(audio[rate])] = audio[rate]
        arr[i] = row


def _str_array(group: zarr.Group, name: str, values: list[str]) -> None:
    arr = group.create_array(name, shape=(len(values),), dtype=str, chunks=(max(1, len(values)),),
                             compressors=codecs(), config=ARRAY_CONFIG, dimension_names=["video"])
    if values:
        arr[:] = np.asarray(values, dtype=str)


def open_decoded(shard: str | Path, arrays: list[str] | None = None) -> zarr.Group:
    """A decoded shard opened for reading after the cheap integrity check of ``arrays``
    (default: all): unreadable metadata or a missing/truncated chunk file raises
    ``avepipe.verify.StoreDamagedError`` naming store, array and chunk. Checksums are
    checked by the codec on every read; ``avepipe.verify.read_checked(shard, group, name,
    rows)`` turns a failed read into the same error."""
    return open_checked(shard, arrays)


def _decode_job(item: dict, audio_rates: list[int], k: int, seed: int, ffmpeg_threads: int):
    """(frames, audio), None -- or None, the exception (raised in the caller, in video order)."""
    try:
        return _decode_one(item, audio_rates, k, seed, ffmpeg_threads), None
    except Exception as exc:  # noqa: BLE001 - sorted out by the caller
        return None, exc


class _NoProgress:
    def update(self, n: int = 1, **_) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def decode_shard(rows: pd.DataFrame, out: str | Path, *, n_segments: int | None, audio_rates: list[int],
                 sample_frames_per_segment: int = 1, seed: int = 0, on_error: str = "skip",
                 progress: bool = True, threads: int = 0) -> pd.DataFrame:
    """Decode the videos of ``rows`` (index rows of one shard) into the Zarr store ``out``.

    Returns the per-video status table (video_id, path, status, reason, warnings,
    n_segments and the probe facts). ``on_error="fail"`` raises MediaError on the
    first bad video instead of marking it failed; no partial store is left.
    ``threads`` (decode.threads): videos decoded at once, one FFmpeg thread each; 0: one
    video at a time on FFmpeg's own threads. The store is the same either way (a file cut
    short fails either way; the wording of its reason can differ).
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    if sample_frames_per_segment < 0:
        raise ValueError("sample_frames_per_segment must be >= 0 (0: no frame sample, e.g. no fine-tuning)")
    if n_segments is not None and n_segments < 1:
        raise ValueError("n_segments must be >= 1 or None")
    for col in ("video_id", "path"):
        if col not in rows:
            raise ValueError(f"decode_shard: index rows lack column {col!r}")
    audio_rates = [int(r) for r in audio_rates]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)

    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    workers, ffmpeg_threads = (int(threads), 1) if threads >= 1 else (1, 0)
    groups = {vid: g for vid, g in rows.groupby("video_id", sort=True)}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode-probe") as pool:
        plans = list(pool.map(lambda vg: _plan(str(vg[0]), vg[1], n_segments), groups.items()))
    for item in plans:
        if item["status"] == "failed" and on_error == "fail":
            raise media.MediaError(item["path"], item["reason"])
    n, k = len(plans), int(sample_frames_per_segment)
    max_seg = max([p["n_segments"] for p in plans] + [1])

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        mark_writer(tmp)
        # every chunk is written, zeros included (ARRAY_CONFIG): a missing one is damage
        audio_arrays = {
            r: root.create_array(f"audio_{r}", shape=(n, max_seg * r), chunks=(1, max_seg * r),
                                 dtype="float32", fill_value=0.0, compressors=AUDIO_COMPRESSORS,
                                 config=ARRAY_CONFIG, dimension_names=["video", "sample"])
            for r in audio_rates}
        frames_arr = root.create_array("frames", shape=(n, max_seg, k, *FRAME_SIZE, 3),
                                       chunks=(1, max_seg, max(k, 1), *FRAME_SIZE, 3), dtype="uint8", fill_value=0,
                                       compressors=FRAME_COMPRESSORS, config=ARRAY_CONFIG,
                                       dimension_names=FRAME_DIMS)
        written = np.zeros(n, bool)
        # `workers` videos decode at once (PyAV releases the GIL while decoding); rows are
        # written in video order by a background thread (compression and I/O release the
        # GIL too). At most workers + 1 decoded videos wait, so memory does not grow with n.
        todo = iter([i for i, p in enumerate(plans) if p["status"] == "ok"])
        window: deque = deque()
        pending = None
        bar = (Progress(sum(p["status"] == "ok" for p in plans), desc=f"decode {out.name}", unit="video",
                        logger=log) if progress else _NoProgress())
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-write") as writer, bar:
            def submit() -> None:
                i = next(todo, None)
                if i is not None:
                    window.append((i, pool.submit(_decode_job, plans[i], audio_rates, k, seed, ffmpeg_threads)))

            for _ in range(workers + 1):
                submit()
            while window:
                i, future = window.popleft()
                result, exc = future.result()
                submit()
                bar.update(1)
                item = plans[i]
                if isinstance(exc, media.MediaError):
                    if on_error == "fail":
                        for _, f in window:
                            f.cancel()
                        raise exc
                    item.update(status="failed", reason=exc.reason, n_segments=0)
                    continue
                if exc is not None:  # a decoder surprise must not sink the other videos
                    if on_error == "fail":
                        for _, f in window:
                            f.cancel()
                        raise media.MediaError(item["path"], f"unexpected error: {exc!r}") from exc
                    log.error("decoding %s", item["path"], exc_info=exc)
                    item.update(status="failed", reason=f"unexpected error: {exc!r}", n_segments=0)
                    continue
                frames, audio = result
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_row, frames_arr, audio_arrays, i, frames, audio)
                written[i] = True
            if pending is not None:
                pending.result()
        no_frames = np.zeros((0, k, *FRAME_SIZE, 3), np.uint8)
        no_audio = {r: np.zeros(0, np.float32) for r in audio_rates}
        for i in np.flatnonzero(~written):  # failed videos: zero rows, written like the others
            _write_row(frames_arr, audio_arrays, int(i), no_frames, no_audio)
        for item in plans:
            if item["status"] != "ok":
                item["n_segments"] = 0
        _str_array(root, "video_id", [p["video_id"] for p in plans])
        _str_array(root, "status", [p["status"] for p in plans])
        _str_array(root, "reason", [p["reason"] for p in plans])
        _str_array(root, "warnings", ["; ".join(p["warnings"]) for p in plans])
        seg = root.create_array("n_segments", shape=(n,), chunks=(max(1, n),), dtype="int32",
                                compressors=codecs(), config=ARRAY_CONFIG, dimension_names=["video"])
        if n:
            seg[:] = np.array([p["n_segments"] for p in plans], np.int32)
        config = {"n_segments": n_segments, "audio_rates": audio_rates,
                  "sample_frames_per_segment": k, "seed": seed, "on_error": on_error}
        root.attrs.update({
            "probe": {p["video_id"]: {key: _clean_json(p["probe"].get(key)) for key in PROBE_KEYS}
                      for p in plans if p["probe"]},
            "resampler": dict(media.RESAMPLER),
            "provenance": provenance("decode", config, resampler=dict(media.RESAMPLER),
                                     frame_size=list(FRAME_SIZE),
                                     frame_interpolation=media.FRAME_INTERPOLATION,
                                     downmix="mean of channels"),
        })
        finish_store(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _status_table(plans)


def _status_table(plans: list[dict]) -> pd.DataFrame:
    recs = []
    for p in plans:
        rec = {"video_id": p["video_id"], "path": p["path"], "status": p["status"], "reason": p["reason"],
               "warnings": "; ".join(p["warnings"]), "n_segments": p["n_segments"]}
        for key, col in MANIFEST_PROBE.items():
            rec[col] = p["probe"].get(key, np.nan)
        recs.append(rec)
    cols = ["video_id", "path", "status", "reason", "warnings", "n_segments", *MANIFEST_PROBE.values()]
    return pd.DataFrame.from_records(recs, columns=cols)


def read_status(shard: str | Path) -> pd.DataFrame:
    """Per-video table of a decoded shard: status, reason, warnings, n_segments, probe facts."""
    root = open_decoded(shard, list(STATUS_ARRAYS))
    probe = root.attrs.get("probe", {})
    arrays = {k: read_checked(shard, root, k) for k in STATUS_ARRAYS}
    vids = [str(v) for v in arrays["video_id"]]
    df = pd.DataFrame({
        "video_id": vids,
        "status": [str(v) for v in arrays["status"]],
        "reason": [str(v) for v in arrays["reason"]],
        "warnings": [str(v) for v in arrays["warnings"]],
        "n_segments": np.asarray(arrays["n_segments"], dtype=np.int64),
    })
    for key, col in MANIFEST_PROBE.items():
        df[col] = [np.nan if probe.get(v, {}).get(key) is None else probe[v][key] for v in vids]
    return df


def collect_manifest(index: pd.DataFrame, shard_paths) -> pd.DataFrame:
    """The index joined with per-video decode status, reason, warnings and probe facts.

    Samples whose video is in no shard are marked failed ("file missing" when the
    index says so, else "not decoded").
    """
    tables = [read_status(p) for p in shard_paths]
    empty = pd.DataFrame(columns=["video_id", "status", "reason", "warnings", "n_segments",
                                  *MANIFEST_PROBE.values()])
    status = pd.concat(tables, ignore_index=True) if tables else empty
    status = status.drop_duplicates("video_id", keep="last")
    clash = [c for c in status.columns if c != "video_id" and c in index.columns]
    manifest = index.drop(columns=clash).merge(status, on="video_id", how="left")
    absent = manifest["status"].isna()
    exists = (manifest["exists"].astype(bool) if "exists" in manifest
              else pd.Series(True, index=manifest.index))
    manifest.loc[absent, "status"] = "failed"
    manifest.loc[absent, "reason"] = np.where(exists[absent], "not decoded", "file missing")
    manifest["warnings"] = manifest["warnings"].fillna("")
    manifest["n_segments"] = manifest["n_segments"].fillna(0).astype("int64")
    for col in ("width", "height", "audio_rate", "audio_channels"):
        manifest[col] = pd.to_numeric(manifest[col], errors="coerce").astype("Int64")
    for col in ("probe_duration", "fps"):
        manifest[col] = pd.to_numeric(manifest[col], errors="coerce").astype("float64")
    return manifest
