"""Data of the fine-tuning stage (avepipe.training.finetune): which videos, and their frames, waveforms
and partner vectors, read from the decoded shards and feature stores.

Only train (+ val, by config) videos are used: the split filter runs on the manifest before
any frame, waveform or feature is read, and `load_finetune_data` refuses test ids (tested).
Frames and waveforms are read from the shards on demand, batch by batch (AVE train+val is
~6 GB of frames, UnAV-100 ~60 GB: they are not held in memory).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from avepipe.decode import open_decoded
from avepipe.extract import audio_inputs
from avepipe.verify import read_array, read_checked

log = logging.getLogger(__name__)


class TestSplitError(RuntimeError):
    """Test videos reached the fine-tuning data (forbidden: it would leak the test split)."""


class _RowSource:
    """Rows ``rows[i]`` of the arrays ``arrays[i]`` (one per decoded shard, read from the shard
    at ``shards[i]``), cut to the video's real seconds (the shards are zero-padded past them).
    A damaged chunk raises StoreDamagedError naming shard, array and chunk."""

    def __init__(self, arrays: list, rows: list[int], n_segments: np.ndarray, per_second: int = 1, *,
                 shards: list[str], name: str):
        self._arrays, self._rows, self._nseg, self._per = arrays, rows, n_segments, per_second
        self._shards, self._name = shards, name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        sel = (self._rows[i], slice(0, int(self._nseg[i]) * self._per))
        return read_array(self._shards[i], self._name, self._arrays[i], sel)


class FrameSource(_RowSource):
    """``source[i]`` -> uint8 (n_segments_i, K, 224, 224, 3): the per-second frame sample."""

    @property
    def per_second(self) -> int:
        return int(self._arrays[0].shape[2]) if self._arrays else 0


class WaveSource(_RowSource):
    """``source[i]`` -> float32 (n_segments_i * rate,): the decoded mono waveform."""

    @property
    def rate(self) -> int:
        return self._per


@dataclass
class FinetuneData:
    video_ids: list[str]
    n_segments: np.ndarray  # (N,) real seconds per video
    frames: FrameSource | None = None  # frames[i]: (T_i, K, 224, 224, 3) uint8, when the visual side trains
    waves: WaveSource | None = None  # waves[i]: (T_i * rate,) float32, when the audio side trains
    audio: np.ndarray | None = None  # (N, D) partner: mean of per-step audio features (visual side)
    visual: np.ndarray | None = None  # (N, C) partner: mean over steps and space of visual features (audio side)

    def __len__(self) -> int:
        return len(self.video_ids)


def select_videos(manifest: pd.DataFrame, include_val: bool) -> list[str]:
    """Unique ok video ids of train (+val); test never passes. A video id that also appears
    in test (AVE has 8 such duplicates) is dropped: its frames are test data."""
    for col in ("video_id", "split", "status"):
        if col not in manifest:
            raise ValueError(f"fine-tuning manifest lacks column {col!r} (expected manifest.parquet)")
    splits = {"train", "val"} if include_val else {"train"}
    ok = manifest[manifest["status"] == "ok"]
    test_ids = set(manifest.loc[manifest["split"] == "test", "video_id"])
    return sorted(set(ok.loc[ok["split"].isin(splits), "video_id"]) - test_ids)


def store_means(store: Sequence[Path], video_ids: list[str]) -> np.ndarray:
    """(N, C) float32: per video, the mean over its real steps (and over space for 7x7 maps)
    of the features in ``store`` — reduced lazily, so a visual store is never loaded whole."""
    from avepipe.store import open_features

    fs = open_features([Path(p) for p in store], video_ids=video_ids)
    f = fs.features.astype(np.float32)
    if f.ndim > 3:  # (N, T, 7, 7, C): spatial mean first
        f = f.mean(axis=tuple(range(2, f.ndim - 1)))
    lengths = np.asarray(fs.lengths)
    if (lengths < 1).any():
        bad = [str(v) for v, n in zip(fs.video_ids, lengths) if n < 1][:3]
        raise ValueError(f"{store[0]}...: partner features missing (0 steps) for e.g. {bad}")
    # mean over the real steps of each video (the store is zero-padded past them)
    mask = (np.arange(f.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
    s = (f * mask[..., None]).sum(axis=1).compute()
    return (s / mask.sum(1)[:, None]).astype(np.float32)


def load_finetune_data(manifest: pd.DataFrame, decoded: Sequence[Path], partner_store: Sequence[Path] = (),
                       include_val: bool = True, *, frames: bool = True, audio_rate: int | None = None,
                       partner: str | None = "audio") -> FinetuneData:
    """Train (+val) videos of the decoded shards with what the trained side(s) need: the frame
    sample (``frames``), the waveform at ``audio_rate``, and the partner side's mean vector read
    from ``partner_store`` (``partner`` = "audio" | "visual" | None)."""
    ids = select_videos(manifest, include_val)
    test_ids = set(manifest.loc[manifest["split"] == "test", "video_id"])
    if test_ids & set(ids):  # defensive: select_videos must never let this happen
        raise TestSplitError(f"test videos in fine-tuning data: {sorted(test_ids & set(ids))[:5]}")
    wanted = set(ids)
    wave_key = f"audio_{audio_rate}" if audio_rate else None
    f_arrays, w_arrays, rows, nseg, got, seen, paths = [], [], [], [], [], set(), []
    for path in decoded:
        g = open_decoded(path)  # every chunk file there; contents checked on each read
        vids = [str(v) for v in read_checked(path, g, "video_id")]
        sel = [i for i, v in enumerate(vids) if v in wanted and v not in seen]
        if not sel:
            continue
        if frames and ("frames" not in g or g["frames"].shape[2] == 0):
            raise ValueError(f"{path}: no frame sample stored; set decode.sample_frames_per_segment >= 1")
        if wave_key and wave_key not in g:
            raise ValueError(f"{path}: no {wave_key} array; add {audio_rate} to decode.audio_rates")
        status = [str(v) for v in read_checked(path, g, "status")]
        n_segments = read_checked(path, g, "n_segments")
        for i in sel:
            if status[i] != "ok" or n_segments[i] < 1:
                raise ValueError(f"{path}: video {vids[i]} is {status[i]!r} with {n_segments[i]} seconds "
                                 "in the decoded shard but ok in the manifest")
            if frames:
                f_arrays.append(g["frames"])
            if wave_key:
                w_arrays.append(g[wave_key])
            rows.append(i)
            paths.append(str(path))
            nseg.append(int(n_segments[i]))
            got.append(vids[i])
            seen.add(vids[i])
    if not got:
        raise ValueError("no train/val videos in the decoded shards for fine-tuning")
    missing = sorted(wanted - set(got))
    if missing:
        log.warning("%d train/val videos are in no decoded shard, e.g. %s", len(missing), missing[:3])
    if len({a.shape[2] for a in f_arrays}) > 1:
        raise ValueError("decoded shards disagree on frames per second (decode.sample_frames_per_segment)")
    nseg = np.asarray(nseg)
    data = FinetuneData(got, nseg)
    if frames:
        data.frames = FrameSource(f_arrays, rows, nseg, shards=paths, name="frames")
    if wave_key:
        data.waves = WaveSource(w_arrays, rows, nseg, int(audio_rate), shards=paths, name=wave_key)
    if partner is not None:
        if not partner_store:
            raise ValueError(f"fine-tuning needs the {partner} feature store as the frozen partner")
        setattr(data, partner, store_means(partner_store, got))
    return data


def batch_frames(data: FinetuneData, idx: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """uint8 (sum T_i, 224, 224, 3): for each video of ``idx`` and each of its seconds, the
    frame ``pick`` chooses among that second's K samples (one random frame per second)."""
    out, at = [], 0
    for i in idx:
        f = data.frames[int(i)]  # (T, K, H, W, 3)
        t = f.shape[0]
        out.append(f[np.arange(t), pick[at:at + t]])
        at += t
    return np.ascontiguousarray(np.concatenate(out))


def batch_waves(data: FinetuneData, idx: np.ndarray, options: Any = None) -> np.ndarray:
    """float32 (sum T_i, samples): the rows of each video of ``idx`` on the 1-s segment grid,
    cut exactly as the extraction stage cuts them for the encoder whose options object
    (``EncoderSpec.check_options``) is ``options`` (avepipe.extract.audio_inputs: the
    encoder's ``cut_audio`` hook, else 1-s chunks)."""
    rate = data.waves.rate
    out = []
    for i in idx:
        t = int(data.n_segments[int(i)])
        out.append(audio_inputs(options, data.waves[int(i)], rate, np.arange(t, dtype=np.float64), 1.0, False))
    return np.ascontiguousarray(np.concatenate(out))
