"""Frames for the visual encoders: recipes, one decoding pass for several recipes, the
per-shard frames store, and preprocessing on the CPU or on the model's device.

A visual encoder's preprocessing is two stages:

1. its **frame recipe**: which frames (``time``: by presentation time, the centres of F
   equal parts of each step; ``script_index``: by decode position, the AVE script's grid)
   and the resize/crop that turns them into uint8 224x224 images;
2. its **normalisation**: uint8 -> the float model input (ImageNet mean/std, or BGR minus
   the Caffe means).

Encoders with equal recipes see the same uint8 frames, so a run with several visual
encoders decodes each video once: the ``frames`` rule writes, per shard, one array per
recipe (:func:`write_frames_shard`), and each visual extraction reads its recipe's array
(:class:`FramesReader`) instead of decoding. Stage 1 also has a device form
(:func:`resize_frames` with ``on_device=True``: the torchvision resizes in float, rounded
to integers, as torchvision resizes uint8 images on a GPU; the AVE script's ``cv2.resize``
as the same integer arithmetic on the device, bit-identical), so with CUDA the decode
workers only decode and the resize runs beside the model. Stage 2 always runs on the
model's device.

An encoder states its recipe with a ``frame_recipe(per_step)`` method on its options
object (ResNet-50 and VGG-19 do). An encoder without one is decoded and preprocessed as before (its ``select_frames`` hook
and ``LoadedEncoder.preprocess``).

Why one long module: recipes, their CPU and device forms, the shared decoding pass and the
frames store must agree bit for bit (tests/test_frames.py); kept together so a recipe is
changed in one place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import zarr
from torchvision.transforms.v2 import functional as TF
from zarr.codecs import BloscCodec, Crc32cCodec

from avepipe import media
from avepipe.progress import Progress
from avepipe.provenance import provenance
from avepipe.store import finish_store, mark_writer, remove_stale_temporaries

log = logging.getLogger(__name__)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras imagenet_utils, caffe mode
SIZE = 224


# --------------------------------------------------------------------------- step grid
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


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class FrameRecipe:
    """How an encoder picks and resizes frames (``select``, ``per_step``, ``resize``) and
    turns them into model input (``normalize``). Only the first three decide the frames,
    so they alone make the ``key`` under which the frames store keeps them."""

    select: str      # "time" | "script_index"
    per_step: int    # frames per step (frames_per_segment)
    resize: str      # a key of RESIZES
    normalize: str   # a key of NORMALIZES

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise ValueError(f"frame selection must be one of {SELECTIONS}, got {self.select!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {tuple(RESIZES)}, got {self.resize!r}")
        if self.normalize not in NORMALIZES:
            raise ValueError(f"normalize must be one of {tuple(NORMALIZES)}, got {self.normalize!r}")
        if self.per_step < 1:
            raise ValueError(f"per_step must be >= 1, got {self.per_step}")

    @property
    def key(self) -> str:
        return f"{self.select}{self.per_step}-{self.resize}"

    @property
    def device_resize(self) -> bool:
        """Whether the resize has a device form (else it runs on the CPU)."""
        return RESIZES[self.resize]["device"]

    def describe(self) -> dict:
        return {**asdict(self), "key": self.key, "selection": SELECTIONS[self.select],
                "resize_detail": RESIZES[self.resize]["what"], "normalize_detail": NORMALIZES[self.normalize]}

    @classmethod
    def from_dict(cls, d: dict) -> "FrameRecipe":
        return cls(d["select"], int(d["per_step"]), d["resize"], d["normalize"])


SELECTIONS = {
    "time": "by presentation time: the centres of F equal parts of each step",
    "script_index": "by decode position, the AVE script: int(s*fi + i/F*span*fi), fi = int(n_decoded / duration)",
}


def _resize_short_crop(x: torch.Tensor, short: int, crop: int) -> torch.Tensor:
    return TF.center_crop(TF.resize(x, [short], antialias=True), [crop])


def _resize_square(x: torch.Tensor) -> torch.Tensor:
    return TF.resize(x, [SIZE, SIZE], antialias=True)


RESIZES: dict[str, dict] = {
    "resize232_crop224": {"fn": partial(_resize_short_crop, short=232, crop=SIZE), "device": True,
                          "what": "shorter side to 232, bilinear antialiased, centre crop 224 (ResNet-50 V2)"},
    "resize256_crop224": {"fn": partial(_resize_short_crop, short=256, crop=SIZE), "device": True,
                          "what": "shorter side to 256, bilinear antialiased, centre crop 224"},
    "bilinear224": {"fn": _resize_square, "device": True,
                    "what": "224x224 bilinear antialiased, aspect not kept"},
    "cv2_linear224": {"fn": None, "device": True,
                      "what": "cv2.resize INTER_LINEAR 224x224 (bit-exact, integer arithmetic)"},
}


def _cv2_linear_on(x: torch.Tensor) -> torch.Tensor:
    """``resize_linear_u8(x, (224, 224))`` with its tensors on ``x``'s device: the same
    integer arithmetic (exact on any device), for the model's device."""
    from avepipe.encoders.opencv_resize import _coefficients

    n, h, w, _ = x.shape
    if (h, w) == (SIZE, SIZE):
        return x.clone()
    y0, y1, b0, b1 = (t.to(x.device) for t in _coefficients(h, SIZE, clamp_fraction=False))
    x0, x1, a0, a1 = (t.to(x.device) for t in _coefficients(w, SIZE, clamp_fraction=True))
    a0, a1, b0, b1 = a0.view(1, 1, -1, 1), a1.view(1, 1, -1, 1), b0.view(1, -1, 1, 1), b1.view(1, -1, 1, 1)

    def horizontal(rows: torch.Tensor) -> torch.Tensor:
        r = x[:, rows]
        return r[:, :, x0].to(torch.int32) * a0 + r[:, :, x1].to(torch.int32) * a1

    v = (((horizontal(y0) >> 4) * b0) >> 16) + (((horizontal(y1) >> 4) * b1) >> 16)
    return ((v + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def resize_frames(recipe: FrameRecipe | str, frames: Any, on_device: bool = False) -> torch.Tensor:
    """uint8 (N,H,W,3) -> uint8 (N,224,224,3): the recipe's resize (stage 1).

    ``on_device=False``: torchvision's uint8 kernels on the CPU (PIL's arithmetic: the
    antialiased bilinear of PIL, within one grey level) or the cv2-exact resize.
    ``on_device=True``: the same resize computed in float and rounded, as torchvision does
    for uint8 images on a GPU; used on the model's device (tested on the CPU: within one
    grey level of the CPU form); the cv2-exact resize runs its integer arithmetic on the
    device (bit-identical). The result is a NHWC view of channels-last memory."""
    name = recipe if isinstance(recipe, str) else recipe.resize
    x = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (N,H,W,3), got {x.dtype} {tuple(x.shape)}")
    if name == "cv2_linear224":
        if on_device:
            return _cv2_linear_on(x)
        from avepipe.encoders.opencv_resize import resize_linear_u8

        return resize_linear_u8(x, (SIZE, SIZE))
    fn = RESIZES[name]["fn"]
    nchw = x.permute(0, 3, 1, 2)  # channels-last view: torchvision's fast uint8 path keeps it
    if len(nchw) == 0:
        return torch.empty((0, SIZE, SIZE, 3), dtype=torch.uint8, device=x.device)
    if on_device:
        y = fn(nchw.float()).round_().clamp_(0, 255).to(torch.uint8)
    else:
        y = fn(nchw)
    return y.permute(0, 2, 3, 1)


def _normalize_imagenet(x: torch.Tensor) -> torch.Tensor:
    x = TF.to_dtype(x.permute(0, 3, 1, 2), torch.float32, scale=True)
    return TF.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def _normalize_caffe_bgr(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=x.device)
    return (x.flip(-1).to(torch.float32) - mean).permute(0, 3, 1, 2)


NORMALIZES = {
    "imagenet": "x/255, ImageNet mean/std, RGB",
    "caffe_bgr": "RGB -> BGR, minus the BGR means 103.939/116.779/123.68 (Keras caffe mode), no scaling",
}
_NORMALIZE_FN = {"imagenet": _normalize_imagenet, "caffe_bgr": _normalize_caffe_bgr}


def normalize_frames(recipe: FrameRecipe | str, frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N,224,224,3) on any device -> float32 (N,3,224,224) model input (stage 2),
    channels-last memory."""
    name = recipe if isinstance(recipe, str) else recipe.normalize
    return _NORMALIZE_FN[name](frames)


def preprocess(recipe: FrameRecipe, frames: Any, on_device: bool = False) -> torch.Tensor:
    """Both stages: uint8 (N,H,W,3) -> float (N,3,224,224)."""
    return normalize_frames(recipe, resize_frames(recipe, frames, on_device))


def recipe_of(encoder: str, options: Any, per_step: int) -> FrameRecipe | None:
    """The frame recipe of ``encoder`` with its checked ``options``: the options'
    ``frame_recipe(per_step)`` hook (declared in the encoder's own file); None when it has
    none (it is then decoded and preprocessed its own way)."""
    hook = getattr(options, "frame_recipe", None)
    return hook(per_step) if hook is not None else None


# --------------------------------------------------------------------------- decoding
def script_frame_indices(n_frames: int, starts: np.ndarray, span: float, per_step: int,
                         duration: float) -> np.ndarray:
    """Decode indices of the AVE script, step-major: ``fi = int(n_frames / duration)``,
    step at ``s`` frame i: ``int(s*fi + (i*1.0/per_step)*span*fi)``. With the AVE grid
    (s = l, span 1, duration 10, per_step 16) the float operations are the script's own,
    so the indices are bit-identical to ``int(l*fi + (i*1.0/16)*fi)``."""
    if n_frames < 1:
        raise ValueError(f"no frames to pick from (n_frames={n_frames})")
    if duration <= 0 or per_step < 1:
        raise ValueError(f"bad grid: duration={duration}, per_step={per_step}")
    fi = int(n_frames / duration)
    frac = np.arange(per_step, dtype=np.float64) * 1.0 / per_step
    pos = np.asarray(starts, np.float64)[:, None] * fi + (frac[None, :] * float(span)) * fi
    return pos.astype(np.int64).reshape(-1)  # int(): truncation, as the script


def _script_plan(starts: np.ndarray, span: float, per_step: int, duration: float, n: int) -> np.ndarray:
    return script_frame_indices(n, starts, span, per_step, duration)


def decode_recipes(path: str, recipes: dict[str, FrameRecipe], starts: np.ndarray, span: float,
                   duration: float, *, resize: bool = True, threads: int = 0) -> dict[str, media.Selection]:
    """One decoding pass of ``path`` for every recipe: key -> Selection (unique frames and
    the step-major ``take`` map, ``len(starts) * per_step`` long). ``resize``: apply each
    recipe's resize on the CPU (uint8 224x224); False keeps the decoded size for the recipes
    with a device resize (the others are always resized here). ``duration`` = the video's
    whole seconds as decoded (``n_segments``), used by the script grid."""
    times, plans, transforms = {}, {}, {}
    for k, r in recipes.items():
        if r.select == "time":
            times[k] = frame_times(starts, span, r.per_step)
        else:
            plans[k] = partial(_script_plan, np.asarray(starts, np.float64), span, r.per_step, duration)
        if resize or not r.device_resize:
            transforms[k] = partial(_resize_np, r.resize)
    return media.select_frames(path, times=times, index_plans=plans, transforms=transforms, threads=threads)


def _resize_np(name: str, frames: np.ndarray) -> np.ndarray:
    return resize_frames(name, torch.from_numpy(frames)).contiguous().numpy()


# --------------------------------------------------------------------------- the frames store
FRAME_CHUNK = 16  # frames per chunk of the store (2.4 MB raw at 224x224x3)
# Scratch data, read once: lz4 (fast both ways), then crc32c so a damaged chunk is noticed
FRAME_CODECS = [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"), Crc32cCodec()]


def _str_array(group: zarr.Group, name: str, values: list[str]) -> None:
    arr = group.create_array(name, shape=(len(values),), dtype=str, chunks=(max(1, len(values)),),
                             dimension_names=["video"])
    if values:
        arr[:] = np.asarray(values, dtype=str)


class FramesReader:
    """Reads a frames store: ``get(key, video_id)`` -> (frames uint8 (U,224,224,3), take)
    or None when the store lacks that recipe, video or data (the caller then decodes), or a
    reason string when the frames job failed on that video."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.group = None
        self.rows: dict[str, int] = {}
        self.recipes: dict[str, dict] = {}
        try:
            g = zarr.open_group(str(self.path), mode="r")
            self.recipes = dict(g.attrs.get("recipes", {}))
            self.rows = {str(v): i for i, v in enumerate(np.asarray(g["video_id"][...]).tolist())}
            self.group = g
        except Exception as exc:  # noqa: BLE001 - emptied or missing: the stage decodes itself
            log.info("frames store %s not readable (%s): decoding in this job", self.path, type(exc).__name__)
        self._status: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def has(self, key: str) -> bool:
        return self.group is not None and key in self.recipes and key in self.group

    def _small(self, key: str):
        if key not in self._status:
            g = self.group[key]
            strs = lambda a: [str(v) for v in np.asarray(g[a][...]).tolist()]  # noqa: E731
            self._status[key] = (strs("status"), strs("reason"), np.asarray(g["n_frames"][...]),
                                 np.asarray(g["n_take"][...]))
        return self._status[key]

    def get(self, key: str, video_id: str):
        if not self.has(key) or video_id not in self.rows:
            return None
        row = self.rows[video_id]
        status, reason, n_frames, n_take = self._small(key)
        if status[row] != "ok":
            return reason[row] or "frames job failed"
        g = self.group[key]
        frames = np.asarray(g["frames"][row, : int(n_frames[row])])
        take = np.asarray(g["take"][row, : int(n_take[row])]).astype(np.int64)
        return frames, take


def _video_plans(decoded: str | Path, window: float | None, hop: float | None) -> tuple[list[str], list, dict]:
    """video ids, step starts per video (None for videos not to extract) and the shard attrs."""
    g = zarr.open_group(str(decoded), mode="r")
    ids = [str(v) for v in np.asarray(g["video_id"][...]).tolist()]
    status = [str(v) for v in np.asarray(g["status"][...]).tolist()]
    n_seg = np.asarray(g["n_segments"][...], np.int64)
    plans = [step_starts(float(n), window, hop) if s == "ok" else None for n, s in zip(n_seg, status)]
    return ids, plans, {"n_segments": n_seg, "status": status, "attrs": dict(g.attrs)}


class _FramesJob(torch.utils.data.Dataset):
    """One video per item: decode once for every recipe and write its rows (in the worker)."""

    def __init__(self, store: str, items: list[tuple], recipes: dict[str, FrameRecipe], span: float,
                 threads: int):
        self.store, self.items, self.recipes, self.span, self.threads = store, items, recipes, span, threads
        self._group = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        """(row, {key: (reason, n_frames, n_take)}, decode seconds)."""
        row, path, starts, duration = self.items[k]
        t0 = time.perf_counter()
        try:
            sel = decode_recipes(path, self.recipes, starts, self.span, duration, threads=self.threads)
        except Exception as exc:  # one bad video never stops the shard
            return row, {key: (_reason(exc), 0, 0) for key in self.recipes}, time.perf_counter() - t0
        if self._group is None:
            self._group = zarr.open_group(self.store, mode="r+")
        done = {}
        for key, s in sel.items():
            g = self._group[key]
            if len(s.frames):
                g["frames"][row, : len(s.frames)] = s.frames
            g["take"][row, : len(s.take)] = s.take.astype(np.int32)
            done[key] = ("", len(s.frames), len(s.take))
        return row, done, time.perf_counter() - t0


def _items(batch):
    return batch


def _reason(exc: BaseException) -> str:
    if isinstance(exc, media.MediaError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def write_frames_shard(decoded_shard: str | Path, index_rows: pd.DataFrame, recipes: list[FrameRecipe],
                       out: str | Path, *, window: float | None = None, hop: float | None = None,
                       workers: int = 1, decoder_threads: int = 1, config: dict | None = None,
                       progress: bool = True) -> Path:
    """Decode every ok video of ``decoded_shard`` once and store, per distinct recipe, its
    selected frames resized to uint8 224x224 (the ``frames`` rule). ``workers`` decoding
    processes (0: in this process) each write their own videos' chunks. A video that fails
    is marked failed for the recipes with its reason (the extraction then fails it too)."""
    if (window is None) != (hop is None):
        raise ValueError("window and hop go together (UnAV mode) or are both None (AVE mode)")
    recipes = {r.key: r for r in recipes}
    if not recipes:
        raise ValueError("no frame recipes given")
    ids, plans, dec = _video_plans(decoded_shard, window, hop)
    span = 1.0 if window is None else float(window)
    paths = {}
    if len(index_rows):
        paths = index_rows.drop_duplicates("video_id").set_index("video_id")["path"].astype(str).to_dict()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    n = len(ids)
    status = {k: ["failed"] * n for k in recipes}
    reason = {k: [""] * n for k in recipes}
    counts = {k: np.zeros((2, n), np.int32) for k in recipes}  # unique frames, take length
    items = []
    for i, vid in enumerate(ids):
        why = ("not decoded" if plans[i] is None else "shorter than one step" if len(plans[i]) == 0
               else "video id not in the sample index" if vid not in paths else "")
        if why:
            for k in recipes:
                reason[k][i] = why
        else:
            items.append((i, paths[vid], plans[i], float(dec["n_segments"][i])))
    t_start = time.perf_counter()
    n_frames = failed = 0
    decode_s = 0.0
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        mark_writer(tmp)
        for k, r in recipes.items():
            g = root.create_group(k)
            most = max([len(p) * r.per_step for p in plans if p is not None] + [1])
            g.create_array("frames", shape=(n, most, SIZE, SIZE, 3), chunks=(1, FRAME_CHUNK, SIZE, SIZE, 3),
                           dtype="uint8", fill_value=0, compressors=FRAME_CODECS,
                           dimension_names=["video", "frame", "height", "width", "rgb"])
            g.create_array("take", shape=(n, most), chunks=(1, most), dtype="int32", fill_value=-1,
                           compressors=[Crc32cCodec()], dimension_names=["video", "position"])
        dataset = _FramesJob(str(tmp), items, recipes, span, decoder_threads)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_items, **({"prefetch_factor": 2} if workers else {}))
        with Progress(len(items), desc=f"frames {out.name}", unit="video",
                      interactive=None if progress else False) as bar:
            for row, done, secs in loader:
                decode_s += secs
                for k, (why, nf, nt) in done.items():
                    status[k][row], reason[k][row] = ("failed", why) if why else ("ok", "")
                    counts[k][:, row] = (nf, nt)
                    n_frames += nf
                failed += any(why for why, _, _ in done.values())
                bar.update(1)
        for k, r in recipes.items():
            g = root[k]
            _str_array(g, "status", status[k])
            _str_array(g, "reason", reason[k])
            g.create_array("n_frames", data=counts[k][0], dimension_names=["video"])
            g.create_array("n_take", data=counts[k][1], dimension_names=["video"])
            g.attrs["recipe"] = r.describe()
        _str_array(root, "video_id", ids)
        wall = time.perf_counter() - t_start
        described = {k: r.describe() for k, r in recipes.items()}
        root.attrs.update({
            "recipes": described,
            "provenance": provenance("frames", config, recipes=described, decoded_shard=str(decoded_shard),
                                     window=window, hop=hop, frame_interpolation=media.FRAME_INTERPOLATION,
                                     decoded_code_fingerprint=dec["attrs"].get("provenance", {}).get(
                                         "code_fingerprint")),
        })
        finish_store(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    n_done = len(items)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("frames %s: %d videos (%d failed), %d frames for %d recipe(s) in %.1f s (%.2f s decode per video, "
             "%d workers); %.1f MB on disk, %.1f MB per video", out, n_done, failed, n_frames, len(recipes), wall,
             decode_s / max(1, n_done), workers, size / 1e6, size / 1e6 / max(1, n_done))
    return out


def empty_frames_store(path: str | Path) -> None:
    """Remove a frames store's frame data once every extraction that reads it has finished,
    keeping the (now empty) store folder, so Snakemake still sees its output: the
    extraction jobs read it as an ``ancient`` input and decode on their own when the data
    are gone (a later rerun of one encoder)."""
    path = Path(path)
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (path / "EMPTIED").write_text(json.dumps({"emptied": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "why": "every extraction that reads these frames has finished"}) + "\n")



# --------------------------------------------------------------------------- command line
def recipes_for(encoders: dict[str, dict]) -> dict[str, FrameRecipe]:
    """encoder -> its frame recipe, from ``{encoder: {frames_per_segment, <its own
    options>}}`` (the `frames` rule's view of the run's visual encoders); encoders without a
    recipe are left out (their extraction decodes on its own)."""
    from avepipe.encoders import get_encoder

    out = {}
    for name, settings in encoders.items():
        settings = dict(settings)
        per_step = int(settings.pop("frames_per_segment", 16))
        spec = get_encoder(name.removesuffix("_ft"))
        if spec.modality != "visual":
            raise ValueError(f"frames: {name} is not a visual encoder")
        recipe = recipe_of(name, spec.check_options(settings), per_step)
        if recipe is not None:
            out[name] = recipe
    return out


def read_readers(files: list[str | Path]) -> tuple[dict[str, dict], float | None, float | None]:
    """{encoder: {frames_per_segment, <its own options>}} and the (window, hop) the readers
    share, from their reader files; readers on different step grids are an error."""
    encs, grids = {}, set()
    for f in files:
        d = json.loads(Path(f).read_text())
        encs[d["encoder"]] = {"frames_per_segment": d["frames_per_segment"], **d.get("options", {})}
        grids.add((d.get("window"), d.get("hop")))
    if len(grids) > 1:
        raise ValueError(f"frames: readers on different step grids (window, hop): {sorted(grids, key=str)}")
    window, hop = grids.pop() if grids else (None, None)
    return encs, window, hop


def run(decoded: str | Path, index: str | Path, readers: Sequence[str | Path], out: str | Path,
        workers: int | None = None) -> Path:
    """`avepipe frames`: write a shard's frames store for the recipes of its reader files."""
    encs, window, hop = read_readers(readers)
    by_encoder = recipes_for(encs)
    workers = workers if workers is not None else max(1, len(os.sched_getaffinity(0)))
    write_frames_shard(decoded, pd.read_parquet(index), list(by_encoder.values()), out, window=window, hop=hop,
                       workers=workers, config={"encoders": encs, "window": window, "hop": hop, "workers": workers},
                       progress=False)
    keys = sorted({r.key for r in by_encoder.values()})
    log.info("%s: %d recipe(s) (%s) for %s", out, len(keys), ", ".join(keys), ", ".join(sorted(by_encoder)))
    return Path(out)
