"""The extraction stage: one encoder over one decoded shard -> one feature shard.

Visual encoders read their frames at ``frames_per_segment`` frames per segment
(contracts.md: the decoded shard keeps only a few frames for fine-tuning): from the
shard's frames store when a run shares one decoding pass between several visual encoders
(``frames=``, the ``frames`` rule, :mod:`avepipe.frames`), else by decoding the mp4 in
``torch.utils.data.DataLoader`` worker processes, which overlap the model forward in the
main process. Audio encoders read the decoded shard's ``audio_<rate>`` waveform. Each video
is isolated: a failure marks that row ``failed`` with its reason and the shard still completes.

Data path of an encoder with a frame recipe (:func:`avepipe.frames.recipe_of`): workers
decode each video once (:func:`avepipe.frames.decode_recipes`), keep every chosen frame
once (a frame picked by several steps, as overlapping UnAV windows do, is run through the
model once) and send uint8 frames, resized on the CPU, or at the decoded size when the
resize runs on the model's device (``resize_on``: ``auto`` = on CUDA when the recipe has a
device form); the model's device normalises them (:func:`avepipe.frames.normalize_frames`).
Workers, prefetch and pinned memory are sized from the machine (:func:`data_path`). The
time the model waits for data is logged per shard and written to ``stats`` (a JSON file
beside Snakemake's benchmark file). A model may fold layers for inference
(``fused_for_inference()``, e.g. ResNet-50's BatchNorms into its convolutions).

Which frames and samples an encoder sees is its recipe's business: an encoder's options
object (``spec.check_options(...)``) may define
* ``frame_recipe(per_step) -> FrameRecipe`` (visual; see avepipe.frames),
* ``select_frames(path, starts, span, per_step, duration) -> frames | None`` (visual, an
  encoder without a recipe), and
* ``cut_audio(wave, rate, starts, span, windowed) -> rows | None`` (audio);
None (or no such method) means the defaults below: frames by presentation time at the
centres of ``per_step`` equal parts of each step, and 1-s chunks of the waveform.
:func:`visual_frames` and :func:`audio_inputs` apply them (fine-tuning uses the same two).

Why one long module: the per-video isolation, the data path (workers, prefetch, wait
share) and the shard's store writing are one loop whose failure handling must stay in
one reading.

Two step grids:
* AVE (``window=None``): one step per 1-s segment, ``n_segments`` steps.
* UnAV (``window``/``hop`` in s): steps start at k*hop while start+window <= duration,
  where duration = the whole seconds the decode stage kept (``n_segments``), so visual
  and audio stores of a video always have the same number of steps.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from avepipe import frames as fr
from avepipe import media
from avepipe.devices import resolve_device
from avepipe.decode import open_decoded
from avepipe.frames import frame_times, step_starts
from avepipe.progress import Progress
from avepipe.provenance import provenance
from avepipe.store import FeatureShardWriter
from avepipe.verify import read_checked

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- plan
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
        name = f"audio_{self.rate}"
        if self._arr is None:
            self._arr = open_decoded(self.shard, [name])
        # a damaged decoded shard is not a bad video: StoreDamagedError stops the job
        wave = read_checked(self.shard, self._arr, name, it.row)
        try:
            chunks = audio_inputs(self.options, wave, self.rate, it.starts, self.span, self.windowed)
            with torch.inference_mode():
                x = self.preprocess(torch.from_numpy(chunks))
            return it.row, x, ""
        except Exception as exc:
            return it.row, None, _reason(exc)


class _RecipeDataset(Dataset):
    """Per video: its recipe's frames from the frames store, else decoded here (one pass)
    and resized unless the resize runs on the model's device. Returns (row, uint8 frames
    (U,H,W,3), take (L,), source, reason, resized): ``resized`` False = still at the decoded
    size (the model's device resizes them); the store's frames are always resized."""

    def __init__(self, items: list[_Item], paths: dict[int, str], video_ids: list[str], span: float,
                 recipe: fr.FrameRecipe, store: str | None, resize_here: bool, decoder_threads: int):
        self.items, self.paths, self.video_ids, self.span = items, paths, video_ids, span
        self.recipe, self.store, self.resize_here, self.threads = recipe, store, resize_here, decoder_threads
        self._reader: fr.FramesReader | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _from_store(self, it: _Item):
        """(frames, take) tensors from the store; None: decode here instead (not in the store,
        unreadable, or failed in the frames job: decoding again gives the failure the same
        reason as in a run without shared decoding)."""
        if self.store is None:
            return None
        if self._reader is None:  # one per worker process
            self._reader = fr.FramesReader(self.store)
        vid = self.video_ids[it.row]
        try:
            got = self._reader.get(self.recipe.key, vid)
        except Exception as exc:  # noqa: BLE001 - a damaged chunk of scratch data: decode instead
            log.warning("frames store %s: %s unreadable (%s); decoding it here", self.store, vid, _reason(exc))
            return None
        if got is None or isinstance(got, str):
            return None
        frames, take = got
        if len(take) != len(it.starts) * self.recipe.per_step:  # another step grid: not these frames
            log.warning("frames store %s: %d frames for %s, expected %d steps x %d; decoding it here", self.store,
                        len(take), vid, len(it.starts), self.recipe.per_step)
            return None
        return torch.from_numpy(frames), torch.from_numpy(take)

    def __getitem__(self, k: int):
        it = self.items[k]
        try:
            got = self._from_store(it)
            if got is not None:
                return it.row, *got, "store", "", True
            sel = fr.decode_recipes(self.paths[it.row], {"r": self.recipe}, it.starts, self.span, it.duration,
                                    resize=self.resize_here, threads=self.threads)["r"]
            resized = self.resize_here or not self.recipe.device_resize
            return it.row, torch.from_numpy(sel.frames), torch.from_numpy(sel.take), "decoded", "", resized
        except Exception as exc:  # isolate: one bad file must not stop the shard
            return it.row, None, None, "decoded", _reason(exc), True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, media.MediaError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def _identity(batch):
    return batch


# --------------------------------------------------------------------------- data path
@dataclass
class DataPath:
    """How frames reach the model: decode workers, their prefetch, FFmpeg threads per
    worker, pinned memory, and where the recipe's resize runs."""

    workers: int
    prefetch: int
    decoder_threads: int
    pin_memory: bool
    resize_on: str  # "cpu" (decode workers) | "device" (beside the model)

    def loader_kwargs(self) -> dict:
        kw: dict[str, Any] = {"num_workers": self.workers, "pin_memory": self.pin_memory}
        if self.workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=self.prefetch)
        return kw


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def data_path(device: torch.device, workers: int | None = None, resize_on: str = "auto",
              recipe: fr.FrameRecipe | None = None, cores: int | None = None) -> DataPath:
    """The data path for ``device`` on this machine (``cores`` available to the job).

    CPU: the model's threads take the cores, so one decode worker (it decodes while the
    model computes; more workers only take cycles from the model); resize in the worker
    (torchvision's uint8 kernels are several times cheaper than the float resize).
    CUDA: the model needs little CPU, so every core but one decodes, each with one FFmpeg
    thread (videos in parallel scale better than threads within one video); the resize
    runs on the device (every recipe has a device form, the cv2-exact one included);
    pinned memory for fast copies.
    ``workers`` / ``resize_on`` given explicitly win. Prefetch: about 4 videos in flight
    in all, at least 2 per worker."""
    cores = cores or available_cores()
    cuda = device.type == "cuda"
    if workers is None:
        workers = max(1, min(cores - 1, 16)) if cuda else 1
    if resize_on == "auto":
        resize_on = "device" if cuda and (recipe is None or recipe.device_resize) else "cpu"
    if resize_on not in ("cpu", "device"):
        raise ValueError(f"resize_on must be auto, cpu or device, got {resize_on!r}")
    if resize_on == "device" and recipe is not None and not recipe.device_resize:
        resize_on = "cpu"  # a recipe without a device form
    threads = 1 if workers > 1 or not cuda else max(1, cores - 1)
    prefetch = max(2, -(-4 // max(1, workers)))
    return DataPath(workers=int(workers), prefetch=prefetch, decoder_threads=threads, pin_memory=cuda,
                    resize_on=resize_on)


# --------------------------------------------------------------------------- model
def _forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int,
             channels_last: bool) -> torch.Tensor:
    """Model outputs for all of ``x`` (float model input) in batches of ``batch_size``,
    float32 on CPU (encoders without a frame recipe, audio encoders)."""
    outs = []
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for b in range(0, x.shape[0], batch_size):
            xb = x[b:b + batch_size]
            if cuda and not xb.is_pinned():
                xb = xb.pin_memory()
            xb = xb.to(device, non_blocking=True)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            outs.append(model(xb))
    return torch.cat(outs).float().cpu()


def _forward_frames(model: torch.nn.Module, frames: torch.Tensor, recipe: fr.FrameRecipe, device: torch.device,
                    batch_size: int, resize_on_device: bool) -> torch.Tensor:
    """Model outputs for uint8 frames (U,H,W,3): each batch goes to the device as uint8,
    is resized there (``resize_on_device``) and normalised there; float32 on CPU."""
    outs = []
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for b in range(0, frames.shape[0], batch_size):
            xb = frames[b:b + batch_size].to(device, non_blocking=True)
            if resize_on_device:
                xb = fr.resize_frames(recipe, xb, on_device=True)
            outs.append(model(fr.normalize_frames(recipe, xb)))
    return torch.cat(outs).float().cpu()


def _fused(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """The model's inference form (``fused_for_inference()``, when it has one) and what it did."""
    fuse = getattr(model, "fused_for_inference", None)
    if fuse is None:
        return model, []
    fused = fuse()
    return fused, list(getattr(fused, "fusions", ["fused"]))


# --------------------------------------------------------------------------- stage
def _read_decoded(path: Path) -> dict[str, Any]:
    """The decoded shard's small arrays, checksums checked (a damaged shard stops the job)."""
    g = open_decoded(path)

    def strs(k):
        return [str(v) for v in np.asarray(read_checked(path, g, k)).tolist()]

    return {
        "group": g,
        "video_id": strs("video_id"),
        "status": strs("status"),
        "reason": strs("reason"),
        "n_segments": np.asarray(read_checked(path, g, "n_segments"), np.int64),
        "attrs": dict(g.attrs),
    }


class _Clock:
    """Wall time of the loop and the part of it spent waiting for the next item."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.wait = 0.0
        self.model = 0.0

    def next(self, it):
        t = time.perf_counter()
        item = next(it, None)
        self.wait += time.perf_counter() - t
        return item

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.t0


def extract_shard(
    decoded_shard: str | Path,
    index_rows: pd.DataFrame,
    encoder: str,
    weights: str,
    out: str | Path,
    *,
    frames_per_segment: int = 16,
    batch_size: int = 16,
    num_workers: int | None = 1,
    device: str = "auto",
    dtype: str | None = None,
    window: float | None = None,
    hop: float | None = None,
    progress: bool = True,
    channels_last: bool = True,
    config: dict | None = None,
    frames: str | Path | None = None,
    resize_on: str = "auto",
    fuse: bool = True,
    stats: str | Path | None = None,
    **encoder_opts: Any,
) -> Path:
    """Run ``encoder`` with ``weights`` over the videos of ``decoded_shard``; write ``out``.

    ``index_rows``: the sample index rows of this shard (needs ``video_id``, ``path``).
    ``frames``: the shard's frames store (shared decoding); videos it lacks are decoded
    here. ``num_workers`` None: sized from the machine (:func:`data_path`). ``resize_on``:
    auto | cpu | device. ``fuse``: the model's inference fusions (ResNet-50: BatchNorm
    folded into the convolutions). ``stats``: write the data-path timings there (JSON).
    Returns ``out``. Weight problems raise before any video is touched.
    """
    from avepipe.encoders import get_encoder

    if (window is None) != (hop is None):
        raise ValueError("window and hop go together (UnAV mode) or are both None (AVE mode)")
    spec = get_encoder(encoder)
    options = spec.check_options(encoder_opts)  # its hooks pick frames / cut the waveform
    dev = resolve_device(device)
    visual = spec.modality == "visual"
    recipe = fr.recipe_of(encoder, options, frames_per_segment) if visual else None
    path_cfg = data_path(dev, num_workers, resize_on, recipe)

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
    resize_on_device = recipe is not None and path_cfg.resize_on == "device"
    items, paths, failed = [], {}, {}
    for row, vid in enumerate(ids):
        if dec["status"][row] != "ok":
            failed[row] = dec["reason"][row] or "decode failed"
        elif visual and vid not in paths_by_id:
            failed[row] = "video id not in the sample index"
        elif len(plans[row]) == 0:
            failed[row] = f"shorter than one step ({dec['n_segments'][row]} s)"
        else:
            items.append(_Item(row, plans[row], float(dec["n_segments"][row])))
            if visual:
                paths[row] = paths_by_id[vid]

    it = None
    if recipe is not None:  # start decoding now: the first videos are ready when the model is
        ds: Dataset = _RecipeDataset(items, paths, ids, span, recipe, None if frames is None else str(frames),
                                     resize_here=not resize_on_device, decoder_threads=path_cfg.decoder_threads)
        it = iter(DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_identity, **path_cfg.loader_kwargs()))
    load_opts = {"channels_last": channels_last, **encoder_opts} if visual else dict(encoder_opts)
    try:
        loaded = spec.load(weights, device=dev, **load_opts)  # fails fast on bad weights, before any store
    except BaseException:
        del it  # stops the decode workers
        raise
    model, fusions = _fused(loaded.model.eval()) if fuse else (loaded.model.eval(), [])
    model = model.to(dev)

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
        frame_recipe=recipe.describe() if recipe is not None else None,
        resize_on=path_cfg.resize_on if recipe is not None else None,
        inference_fusions=fusions,
        decoded_shard=str(decoded_shard),
        decoded_code_fingerprint=dec["attrs"].get("provenance", {}).get("code_fingerprint"),
        encoder_options=encoder_opts,
    )

    sources = {"store": 0, "decoded": 0}
    n_frames = n_model_frames = 0
    with FeatureShardWriter(out, ids, T, step_shape, dtype, rec) as writer:
        for row, reason in failed.items():
            writer.write(row, None, status="failed", reason=reason)
        if recipe is None:
            if visual:
                ds = _VisualDataset(items, paths, span, frames_per_segment, loaded.preprocess, options)
            else:
                ds = _AudioDataset(items, str(decoded_shard), int(rate), span, loaded.preprocess, options,
                                   windowed=window is not None)
            it = iter(DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_identity,
                                 **path_cfg.loader_kwargs()))
        clock = _Clock()
        with Progress(len(ds), desc=f"extract {encoder} {Path(out).name}", unit="video",
                      interactive=None if progress else False, logger=log) as bar:
            while (item := clock.next(it)) is not None:
                t_model = time.perf_counter()
                if recipe is not None:
                    row, x, take, source, reason, resized = item
                    sources[source] += 1
                else:
                    row, x, reason = item
                if x is None:
                    writer.write(row, None, status="failed", reason=reason)
                    bar.update(1)
                    continue
                try:
                    n = len(plans[row])
                    if recipe is not None:
                        y = _forward_frames(model, x, recipe, dev, batch_size, not resized)
                        n_model_frames += len(y)
                        y = y[take]  # every step's frames, the shared ones computed once
                    else:
                        y = _forward(model, x, dev, batch_size, channels_last and visual)
                        n_model_frames += len(y)
                    if visual:  # mean over the frames of each step
                        n_frames += len(y)
                        y = y.reshape(n, frames_per_segment, *y.shape[1:]).mean(1)
                except Exception as exc:  # a model error on one video fails that video only
                    log.warning("extract %s failed on %s: %s", encoder, ids[row], exc)
                    writer.write(row, None, status="failed", reason=_reason(exc))
                    bar.update(1)
                    continue
                finally:
                    clock.model += time.perf_counter() - t_model
                # outside the try: a wrong output shape is a bug for every video, not a bad file
                writer.write(row, y.numpy(), plans[row])
                share = clock.wait / max(clock.wall, 1e-9)
                bar.update(1, wait=f"{100 * share:.0f}%")
        wall = clock.wall
        result = writer.commit()
    summary = {
        "encoder": encoder, "shard": str(out), "videos": len(ds), "device": dev.type,
        "frames": n_frames, "model_frames": n_model_frames, "wall_s": round(wall, 3),
        "data_wait_s": round(clock.wait, 3), "data_wait_share": round(clock.wait / max(wall, 1e-9), 4),
        "model_s": round(clock.model, 3),
        "frames_per_s": round(n_frames / max(wall, 1e-9), 3) if visual else None,
        "frames_from": sources if recipe is not None else None,
        "data_path": {**vars(path_cfg), "cores": available_cores(), "torch_threads": torch.get_num_threads()},
        "frame_recipe": recipe.key if recipe is not None else None, "inference_fusions": fusions,
    }
    log.info("extract %s -> %s: %d videos in %.1f s; the model waited for data %.1f%% of the time "
             "(%.1f s; %d decode workers, resize on %s)%s", encoder, out, len(ds), wall,
             100 * summary["data_wait_share"], clock.wait, path_cfg.workers, path_cfg.resize_on,
             f"; frames from the store for {sources['store']}, decoded here for {sources['decoded']}"
             if recipe is not None and frames is not None else "")
    if stats is not None:
        Path(stats).parent.mkdir(parents=True, exist_ok=True)
        Path(stats).write_text(json.dumps(summary, indent=2) + "\n")
    return result
