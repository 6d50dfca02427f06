"""The extraction stage: one encoder over one decoded shard -> one feature shard.

Visual encoders decode the mp4 again at ``frames_per_segment`` frames per segment
(contracts.md: the decoded shard keeps only a few frames for fine-tuning) inside a
``torch.utils.data.DataLoader`` so that decoding + preprocessing in worker processes
overlaps the model forward in the main process. Audio encoders read the decoded
shard's ``audio_<rate>`` waveform. Each video is isolated: a failure marks that row
``failed`` with its reason and the shard still completes.

Which frames and samples an encoder sees is its recipe's business: an encoder's options
object (``spec.check_options(...)``) may define
* ``select_frames(path, starts, span, per_step, duration) -> frames | None`` (visual), and
* ``cut_audio(wave, rate, starts, span, windowed) -> rows | None`` (audio);
None (or no such method) means the defaults below: frames by presentation time at the
centres of ``per_step`` equal parts of each step, and 1-s chunks of the waveform.
:func:`visual_frames` and :func:`audio_inputs` apply them (fine-tuning uses the same two).

Two step grids:
* AVE (``window=None``): one step per 1-s segment, ``n_segments`` steps.
* UnAV (``window``/``hop`` in s): steps start at k*hop while start+window <= duration,
  where duration = the whole seconds the decode stage kept (``n_segments``), so visual
  and audio stores of a video always have the same number of steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from avepipe import media
from avepipe.devices import resolve_device
from avepipe.provenance import provenance
from avepipe.store import FeatureShardWriter

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- plan
def step_starts(duration: float, window: float | None, hop: float | None) -> np.ndarray:
    """Start times (s) of the feature steps of a video lasting ``duration`` seconds."""
    if window is None:
        return np.arange(int(np.floor(duration + 1e-9)), dtype=np.float64)
    if window <= 0 or hop is None or hop <= 0:
        raise ValueError(f"window/hop must be positive, got {window}/{hop}")
    # integer count first, so float error never adds or drops a step
    n = int(np.floor((duration - window) / hop + 1e-9)) + 1 if duration + 1e-9 >= window else 0
    return np.round(np.arange(n) * hop, 9)


def frame_times(starts: np.ndarray, span: float, per_step: int) -> np.ndarray:
    """Centres of ``per_step`` equal sub-intervals of [s, s+span) for every start s (step-major)."""
    j = (np.arange(per_step, dtype=np.float64) + 0.5) / per_step * span
    return (np.asarray(starts, np.float64)[:, None] + j[None, :]).reshape(-1)


def audio_chunks(wave: np.ndarray, rate: int, starts: np.ndarray, span: float) -> np.ndarray:
    """(len(starts), rate) float32: the samples of [s, s+span) per start, zero-padded to 1 s.

    The encoders' default input: Cnn14 embeds each 1-s chunk; VGGish with ``framing:
    second`` takes the first 15600 samples (a 0.96-s UnAV window then ends in 240 zeros).
    """
    if span > 1.0 + 1e-9:
        raise ValueError(f"audio window {span} s is longer than the encoders' 1-s input")
    n = int(round(span * rate))
    out = np.zeros((len(starts), rate), np.float32)
    for k, s in enumerate(starts):
        a = int(round(s * rate))
        seg = wave[a:a + n]
        out[k, : len(seg)] = seg
    return out


def visual_frames(options: Any, path: str, starts: np.ndarray, span: float, per_step: int,
                  duration: float) -> np.ndarray:
    """uint8 (len(starts) * per_step, H, W, 3) frames of one video, step-major: the
    encoder's ``select_frames`` hook, else by presentation time (:func:`frame_times`).
    ``duration`` = the video's length in whole seconds as decoded (``n_segments``)."""
    hook = getattr(options, "select_frames", None)
    frames = hook(path, starts, span, per_step, duration) if hook is not None else None
    if frames is None:
        frames = media.read_frames(path, frame_times(starts, span, per_step))
    return frames


def audio_inputs(options: Any, wave: np.ndarray, rate: int, starts: np.ndarray, span: float,
                 windowed: bool) -> np.ndarray:
    """float32 rows, one per step, for the encoder's front end: its ``cut_audio`` hook, else
    :func:`audio_chunks`. ``windowed``: UnAV-style windows rather than 1-s segments."""
    hook = getattr(options, "cut_audio", None)
    rows = hook(wave, rate, starts, span, windowed) if hook is not None else None
    return audio_chunks(wave, rate, starts, span) if rows is None else rows


# --------------------------------------------------------------------------- datasets
@dataclass
class _Item:
    row: int               # row in the decoded / feature shard
    starts: np.ndarray     # step start times
    duration: float = 0.0  # whole seconds the decode stage kept (n_segments)


class _VisualDataset(Dataset):
    """Per video: decode the frames at the plan's times and preprocess them (in a worker)."""

    def __init__(self, items: list[_Item], paths: dict[int, str], span: float, per_step: int,
                 preprocess: Callable, options: Any = None):
        self.items, self.paths, self.span, self.per_step = items, paths, span, per_step
        self.preprocess, self.options = preprocess, options

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        it = self.items[k]
        try:
            frames = visual_frames(self.options, self.paths[it.row], it.starts, self.span, self.per_step,
                                   it.duration)
            with torch.inference_mode():
                x = self.preprocess(torch.from_numpy(frames))
            return it.row, x, ""
        except Exception as exc:  # isolate: one bad file must not stop the shard
            return it.row, None, _reason(exc)


class _AudioDataset(Dataset):
    """Per video: cut the decoded waveform into 1-s chunks (or windows) and preprocess."""

    def __init__(self, items: list[_Item], shard: str, rate: int, span: float, preprocess: Callable,
                 options: Any = None, windowed: bool = False):
        self.items, self.shard, self.rate, self.span = items, shard, rate, span
        self.preprocess, self.options, self.windowed = preprocess, options, windowed
        self._arr = None  # opened lazily: one handle per worker process

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        it = self.items[k]
        try:
            if self._arr is None:
                self._arr = zarr.open_group(self.shard, mode="r")[f"audio_{self.rate}"]
            wave = np.asarray(self._arr[it.row])
            chunks = audio_inputs(self.options, wave, self.rate, it.starts, self.span, self.windowed)
            with torch.inference_mode():
                x = self.preprocess(torch.from_numpy(chunks))
            return it.row, x, ""
        except Exception as exc:
            return it.row, None, _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, media.MediaError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def _identity(batch):
    return batch


# --------------------------------------------------------------------------- model
def _forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int,
             channels_last: bool) -> torch.Tensor:
    """Model outputs for all of ``x`` in batches of ``batch_size``, float32 on CPU."""
    outs = []
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for b in range(0, x.shape[0], batch_size):
            xb = x[b:b + batch_size]
            if cuda:
                xb = xb.pin_memory() if not xb.is_pinned() else xb
            xb = xb.to(device, non_blocking=True)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            outs.append(model(xb).float().cpu())
    return torch.cat(outs)


# --------------------------------------------------------------------------- stage
def _read_decoded(path: Path) -> dict[str, Any]:
    g = zarr.open_group(str(path), mode="r")
    strs = lambda k: [str(v) for v in np.asarray(g[k][...]).tolist()]  # noqa: E731
    return {
        "group": g,
        "video_id": strs("video_id"),
        "status": strs("status"),
        "reason": strs("reason"),
        "n_segments": np.asarray(g["n_segments"][...], np.int64),
        "attrs": dict(g.attrs),
    }


def extract_shard(
    decoded_shard: str | Path,
    index_rows: pd.DataFrame,
    encoder: str,
    weights: str,
    out: str | Path,
    *,
    frames_per_segment: int = 16,
    batch_size: int = 16,
    num_workers: int = 1,
    device: str = "auto",
    dtype: str | None = None,
    window: float | None = None,
    hop: float | None = None,
    progress: bool = True,
    channels_last: bool = True,
    config: dict | None = None,
    **encoder_opts: Any,
) -> Path:
    """Run ``encoder`` with ``weights`` over the videos of ``decoded_shard``; write ``out``.

    ``index_rows``: the sample index rows of this shard (needs ``video_id``, ``path``).
    Returns ``out``. Weight problems raise before any video is touched.
    """
    from avepipe.encoders import get_encoder

    if (window is None) != (hop is None):
        raise ValueError("window and hop go together (UnAV mode) or are both None (AVE mode)")
    spec = get_encoder(encoder)
    options = spec.check_options(encoder_opts)  # its hooks pick frames / cut the waveform
    dev = resolve_device(device)
    visual = spec.modality == "visual"
    load_opts = {"channels_last": channels_last, **encoder_opts} if visual else dict(encoder_opts)
    loaded = spec.load(weights, device=dev, **load_opts)  # fails fast on bad weights
    model = loaded.model.eval().to(dev)

    dec = _read_decoded(Path(decoded_shard))
    ids = dec["video_id"]
    rate = spec.sample_rate
    if not visual and f"audio_{rate}" not in dec["group"]:
        raise KeyError(f"{decoded_shard} has no audio_{rate} array needed by {encoder} "
                       f"(add {rate} to decode.audio_rates)")
    if not visual and window is not None and window > 1.0 + 1e-9:
        raise ValueError(f"{encoder}: audio window {window} s is longer than the encoder's 1-s input")
    paths_by_id: dict[str, str] = {}
    if visual and len(index_rows):
        if "path" not in index_rows.columns:
            raise ValueError("index rows need a 'path' column for visual encoders")
        paths_by_id = index_rows.drop_duplicates("video_id").set_index("video_id")["path"].astype(str).to_dict()

    span = 1.0 if window is None else float(window)
    plans = [step_starts(float(n), window, hop) for n in dec["n_segments"]]
    T = max([len(p) for p in plans] + [1])
    step_shape = tuple(spec.output_shape(encoder_opts))
    dtype = dtype or spec.default_dtype

    rec = provenance(
        f"extract:{encoder}", config,
        encoder=encoder, weights=loaded.weights_info, preprocessing=loaded.options,
        modality=spec.modality, frames_per_segment=frames_per_segment if visual else None,
        sample_rate=rate, dtype=str(np.dtype(dtype)), window=window, hop=hop,
        grid="1-s segments" if window is None else "windows",
        audio_fit=(None if visual or window is None else
                   "zero-pad to 1 s" if getattr(options, "cut_audio", None) is None else
                   "the encoder's framing (preprocessing.framing)"),
        channels_last=channels_last if visual else None, batch_size=batch_size,
        device=dev.type, autocast="bfloat16" if dev.type == "cuda" else None,
        decoded_shard=str(decoded_shard),
        decoded_code_fingerprint=dec["attrs"].get("provenance", {}).get("code_fingerprint"),
        encoder_options=encoder_opts,
    )

    with FeatureShardWriter(out, ids, T, step_shape, dtype, rec) as writer:
        items, paths = [], {}
        for row, vid in enumerate(ids):
            if dec["status"][row] != "ok":
                writer.write(row, None, status="failed", reason=dec["reason"][row] or "decode failed")
            elif visual and vid not in paths_by_id:
                writer.write(row, None, status="failed", reason="video id not in the sample index")
            elif len(plans[row]) == 0:
                writer.write(row, None, status="failed", reason=f"shorter than one step ({dec['n_segments'][row]} s)")
            else:
                items.append(_Item(row, plans[row], float(dec["n_segments"][row])))
                if visual:
                    paths[row] = paths_by_id[vid]
        if visual:
            ds: Dataset = _VisualDataset(items, paths, span, frames_per_segment, loaded.preprocess, options)
        else:
            ds = _AudioDataset(items, str(decoded_shard), int(rate), span, loaded.preprocess, options,
                               windowed=window is not None)
        loader_kw: dict[str, Any] = {}
        if num_workers > 0:
            loader_kw = {"persistent_workers": True, "prefetch_factor": 2}
        loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                            collate_fn=_identity, **loader_kw)
        for row, x, reason in tqdm(loader, total=len(ds), disable=not progress,
                                   desc=f"{encoder} {Path(out).name}", unit="video"):
            if x is None:
                writer.write(row, None, status="failed", reason=reason)
                continue
            try:
                y = _forward(model, x, dev, batch_size, channels_last and visual)
                n = len(plans[row])
                if visual:  # mean over the frames of each step
                    y = y.reshape(n, frames_per_segment, *y.shape[1:]).mean(1)
            except Exception as exc:  # a model error on one video fails that video only
                log.warning("extract %s failed on %s: %s", encoder, ids[row], exc)
                writer.write(row, None, status="failed", reason=_reason(exc))
                continue
            # outside the try: a wrong output shape is a bug for every video, not a bad file
            writer.write(row, y.numpy(), plans[row])
        return writer.commit()
