"""Synthetic AVE / UnAV-100 datasets in the exact real layouts (``avepipe synth``).

Every class has a picture (colour + shape + stripe texture, drifting slowly over a noisy,
changing background) and a sound (harmonic tone set + amplitude modulation over low noise).
An *event* is a time where the class's picture is shown AND its sound plays; as in AVE,
seconds where only one modality carries the class, or picture and sound belong to different
classes, are background. Videos are real mp4 files (h264 + AAC) with varied resolution,
frame rate, sample rate and channel count. Output is a pure function of the seed.

Why one long module: the two datasets share the class styles, the renderer and the split
assignment; the generator's truth (what a model can learn) is easier to check in one place.
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy.signal import butter, lfilter, sosfilt

from .ave import write_annotations, write_order_h5
from .labels import AVE_CLASSES
from .unav100 import UNAV_CLASSES, write_unav100
from .writer import write_mp4

FPS_CHOICES = (24.0, 25.0, 30000 / 1001, 30.0)
SIZE_CHOICES = ((320, 240), (426, 240), (360, 640), (480, 360))  # (width, height); 360x640 is portrait
RATE_CHOICES = (16000, 22050, 44100, 48000)
CHANNEL_CHOICES = (1, 2)
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_PHI = (math.sqrt(5) - 1) / 2  # golden-ratio steps spread the first few classes far apart
_SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross")
_PARTIALS = ((1, 2, 3), (1, 3, 5), (1, 2, 4), (1, 2, 3, 4, 5), (1, 4), (1, 3, 6))
_TONE_GAIN = 0.25
_NOISE_GAIN = 0.02
# Every sound lives below AUDIO_BAND_HZ whatever the file's sample rate (16-48 kHz), so a
# class sounds the same in every file: otherwise the empty band above 8 kHz of a 16-kHz file
# is the largest difference a 32-kHz encoder (Cnn14) sees, larger than the class.
AUDIO_BAND_HZ = 7000.0
_NOISE_CUTOFF_HZ = 250.0  # the hiss is low-passed (one pole) at a cutoff fixed in Hz
OBJECT_SCALE = 0.8  # object size / short side of the frame (see _slots)
_RAMP_S = 0.01  # fade in/out of a sound so that onsets do not click


# ----------------------------------------------------------------------------- class identity
@dataclass(frozen=True)
class ClassStyle:
    """How class ``cls`` looks and sounds (a pure function of the class index)."""

    cls: int
    colour: tuple[int, int, int]  # RGB of the bright stripes; dark stripes are 0.7x
    shape: str
    stripe_angle: float  # radians
    stripe_cycles: float  # stripes across the object
    f0: float  # Hz, 200..1600
    partials: tuple[int, ...]
    am_rate: float  # Hz, 2..8


def class_style(cls: int) -> ClassStyle:
    """Visual and audio signature of class ``cls`` (0-based)."""
    pos = (cls * _PHI) % 1.0
    hue = (pos + 0.02) % 1.0
    sat, val = (0.95, 0.95) if (cls // 10) % 2 == 0 else (0.75, 0.8)
    rgb = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(hue, sat, val))
    f_pos = (cls * _PHI + 0.37) % 1.0
    return ClassStyle(
        cls=cls,
        colour=rgb,
        shape=_SHAPES[cls % len(_SHAPES)],
        stripe_angle=math.pi * ((cls * 3) % 8) / 8,
        stripe_cycles=3.0 + (cls % 4),
        f0=200.0 * 8.0 ** f_pos,
        partials=_PARTIALS[(cls // len(_SHAPES) + cls) % len(_PARTIALS)],
        am_rate=2.0 + 6.0 * ((cls * _PHI * 2 + 0.11) % 1.0),
    )


@lru_cache(maxsize=256)
def _sprite(cls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask (s,s) bool, rgb (s,s,3) uint8) of a class's object at ``size`` pixels."""
    st = class_style(cls)
    v, u = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    r = np.hypot(u, v)
    mask = {
        "disc": r <= 1.0,
        "square": np.maximum(abs(u), abs(v)) <= 0.85,
        "triangle": (v <= 0.85) & (abs(u) <= (v + 1.0) * 0.55),
        "diamond": abs(u) + abs(v) <= 1.0,
        "ring": (r <= 1.0) & (r >= 0.5),
        "cross": ((abs(u) <= 0.33) | (abs(v) <= 0.33)) & (np.maximum(abs(u), abs(v)) <= 0.95),
    }[st.shape]
    proj = u * math.cos(st.stripe_angle) + v * math.sin(st.stripe_angle)
    shade = np.where(np.cos(math.pi * st.stripe_cycles * proj) > 0, 1.0, 0.7)
    rgb = (shade[..., None] * np.asarray(st.colour, dtype=np.float64)).round().astype(np.uint8)
    return mask, rgb


def class_tone(cls: int, t: np.ndarray, sample_rate: int) -> np.ndarray:
    """The class sound at times ``t`` (float64, peak <= 1): harmonics of f0, amplitude-modulated."""
    st = class_style(cls)
    tone = np.zeros_like(t)
    norm = 0.0
    for k in st.partials:
        if k * st.f0 < min(AUDIO_BAND_HZ, 0.45 * sample_rate):  # the same partials at every rate
            tone += np.sin(2 * np.pi * k * st.f0 * t + 0.7 * k) / k
            norm += 1.0 / k
    am = 0.6 + 0.4 * np.sin(2 * np.pi * st.am_rate * t)
    return tone * am / max(norm, 1e-9)


# ----------------------------------------------------------------------------- one video
@dataclass
class Track:
    """Class ``cls`` present on [t0, t1) in ``modality``: ``av`` (an event), ``v`` or ``a`` only."""

    cls: int
    t0: float
    t1: float
    modality: str = "av"


@dataclass
class VideoSpec:
    """Everything needed to render one synthetic video (deterministic given ``seed``)."""

    video_id: str
    duration: float
    fps: float
    width: int
    height: int
    sample_rate: int
    channels: int
    tracks: list[Track] = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "VideoSpec":
        d = dict(d)
        d["tracks"] = [Track(**t) for t in d.get("tracks", [])]
        return VideoSpec(**d)

    @property
    def n_frames(self) -> int:
        return int(round(self.duration * self.fps))

    @property
    def n_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))


def _active(tracks: list[Track], t: float, want: str) -> list[int]:
    return sorted({tr.cls for tr in tracks if want in tr.modality and tr.t0 <= t < tr.t1})


def _slots(width: int, height: int, n: int) -> tuple[list[tuple[float, float]], int]:
    """Object centres and size: one object centred, two side by side (stacked when portrait).

    Objects are large (OBJECT_SCALE of the short side; a pair shares the long side): with
    random encoder weights (the demo) a small object barely moves deep features, and the
    picture is half of the audio-visual rule the heads must learn."""
    short, long = min(width, height), max(width, height)
    if n <= 1:
        return [(width / 2, height / 2)], int(OBJECT_SCALE * short)
    size = int(OBJECT_SCALE * min(short, long / 2))
    if width >= height:
        return [(width / 4, height / 2), (3 * width / 4, height / 2)], size
    return [(width / 2, height / 4), (width / 2, 3 * height / 4)], size


def _background_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: tinted grey with coarse blobs and fine grain."""
    cell = 16
    gh, gw = -(-h // cell) + 1, -(-w // cell) + 1
    coarse = rng.normal(0, 22, size=(gh, gw))
    # bilinear upsampling of the coarse field gives soft blobs rather than blocks
    yi, xi = np.linspace(0, gh - 1, h), np.linspace(0, gw - 1, w)
    y0, x0 = np.floor(yi).astype(int).clip(0, gh - 2), np.floor(xi).astype(int).clip(0, gw - 2)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    blobs = ((1 - fy) * (1 - fx) * coarse[y0][:, x0] + (1 - fy) * fx * coarse[y0][:, x0 + 1]
             + fy * (1 - fx) * coarse[y0 + 1][:, x0] + fy * fx * coarse[y0 + 1][:, x0 + 1])
    base = rng.uniform(80, 140) + rng.uniform(-12, 12, size=3)
    tex = base + blobs[..., None] + rng.normal(0, 6, size=(h, w, 1))
    return np.clip(tex, 0, 255).astype(np.uint8)


def iter_frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    """Frames (H, W, 3) uint8 RGB one by one; frame i is shown at i / fps.

    The background is a noisy texture seen through a wandering window (a shaky, panning
    camera): it changes every frame yet costs one copy per frame to render.
    """
    rng = np.random.default_rng([spec.seed, 1])
    h, w, n = spec.height, spec.width, spec.n_frames
    pad = max(8, int(0.1 * min(h, w)))
    tex = _background_texture(rng, h + 2 * pad, w + 2 * pad)
    times = np.arange(n) / spec.fps
    pan_rate, pan_phase = rng.uniform(0.05, 0.2, size=2), rng.uniform(0, 2 * np.pi, size=2)
    shake = np.cumsum(rng.normal(0, 0.6, size=(n, 2)), axis=0)
    shake -= np.linspace(0, 1, n)[:, None] * shake[-1]  # random walk pinned at both ends stays small
    off = pad + (pad - 3) * np.sin(2 * np.pi * pan_rate * times[:, None] + pan_phase) * 0.8 + shake
    off = np.clip(np.round(off), 0, 2 * pad).astype(int)
    drift = rng.uniform(0, 2 * np.pi, size=(2, 2))  # phase of each slot's x/y wobble
    amp = 0.06 * min(h, w)
    for i in range(n):
        t = times[i]
        oy, ox = off[i]
        frame = tex[oy:oy + h, ox:ox + w].copy()
        shown = _active(spec.tracks, t, "v")[:2]
        centres, size = _slots(w, h, len(shown))
        for k, (cls, (cx, cy)) in enumerate(zip(shown, centres)):
            mask, rgb = _sprite(cls, size)
            rate = class_style(cls).am_rate / 10  # slow wobble, class-specific speed
            x0 = int(round(cx - size / 2 + amp * math.sin(2 * np.pi * rate * t + drift[k, 0])))
            y0 = int(round(cy - size / 2 + amp * math.cos(2 * np.pi * rate * t + drift[k, 1])))
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
            if xb <= xa or yb <= ya:
                continue
            sl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            region = frame[ya:yb, xa:xb]
            region[mask[sl]] = rgb[sl][mask[sl]]
        yield frame


class LazyFrames:
    """Array-like (F, H, W, 3) view of a spec's frames, rendered while iterating.

    ``write_mp4`` only reads ``shape`` and iterates, so a 60-s 640x360 clip is encoded
    without holding ~1 GB of frames in memory.
    """

    def __init__(self, spec: VideoSpec):
        self.spec = spec
        self.shape = (spec.n_frames, spec.height, spec.width, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter_frames(self.spec)


def render_video(spec: VideoSpec) -> np.ndarray:
    """All frames (F, H, W, 3) uint8 RGB (for tests and inspection)."""
    return np.stack(list(iter_frames(spec)))


@lru_cache(maxsize=8)
def _band_filter(sample_rate: int) -> np.ndarray:
    """8th-order Butterworth low-pass at AUDIO_BAND_HZ (second-order sections)."""
    return butter(8, min(AUDIO_BAND_HZ, 0.45 * sample_rate), fs=sample_rate, output="sos")


def render_audio(spec: VideoSpec) -> np.ndarray:
    """Audio (C, S) float32 in [-1, 1]: low coloured noise plus each track's class tone."""
    rng = np.random.default_rng([spec.seed, 2])
    sr, n = spec.sample_rate, spec.n_samples
    t = np.arange(n) / sr
    # a soft hiss with the same spectrum at every sample rate: one-pole low-pass, then band-limited
    pole = math.exp(-2 * math.pi * _NOISE_CUTOFF_HZ / sr)
    noise = lfilter([1.0], [1.0, -pole], rng.normal(0, 1, size=n))
    noise = sosfilt(_band_filter(sr), noise)
    mix = _NOISE_GAIN * noise / (np.std(noise) + 1e-9)
    ramp = max(1, int(_RAMP_S * sr))
    for tr in spec.tracks:
        if "a" not in tr.modality:
            continue
        a, b = int(round(tr.t0 * sr)), min(int(round(tr.t1 * sr)), n)
        if b <= a:
            continue
        env = np.ones(b - a)
        r = min(ramp, (b - a) // 2)
        if r:
            fade = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, r))
            env[:r] *= fade
            env[-r:] *= fade[::-1]
        mix[a:b] += _TONE_GAIN * env * class_tone(tr.cls, t[a:b], sr)
    gains = [1.0] if spec.channels == 1 else [1.0, 0.8] + [0.9] * (spec.channels - 2)
    return np.clip(np.stack([g * mix for g in gains]), -1, 1).astype(np.float32)


def render(spec: VideoSpec) -> tuple[np.ndarray, np.ndarray]:
    """(frames (F,H,W,3) uint8, audio (C,S) float32) of a synthetic video."""
    return render_video(spec), render_audio(spec)


def write_video(path: str | Path, spec: VideoSpec, crf: int = 28) -> Path:
    """Render ``spec`` and encode it as an mp4 (h264 yuv420p + AAC), frame by frame."""
    return write_mp4(path, LazyFrames(spec), spec.fps, render_audio(spec), spec.sample_rate, crf=crf)


# ----------------------------------------------------------------------------- dataset helpers
def make_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct YouTube-like ids (11 chars of [A-Za-z0-9_-], not starting with '-',
    distinct even on case-insensitive file systems)."""
    ids: list[str] = []
    seen: set[str] = set()
    alphabet = np.array(list(_ID_ALPHABET))
    while len(ids) < n:
        vid = "".join(alphabet[rng.integers(0, len(alphabet), size=11)])
        if vid[0] == "-" or vid.lower() in seen:
            continue
        seen.add(vid.lower())
        ids.append(vid)
    return ids


def _balanced(rng: np.random.Generator, choices, n: int) -> list:
    """``n`` picks that cycle through every choice in shuffled blocks (variety even for small n)."""
    out: list = []
    while len(out) < n:
        out.extend(choices[j] for j in rng.permutation(len(choices)))
    return out[:n]


def _media_params(rng, n, fps_choices, size_choices, rate_choices, channel_choices) -> list[dict]:
    fps = _balanced(rng, list(fps_choices), n)
    size = _balanced(rng, list(size_choices), n)
    rate = _balanced(rng, list(rate_choices), n)
    ch = _balanced(rng, list(channel_choices), n)
    return [dict(fps=float(f), width=int(s[0]), height=int(s[1]), sample_rate=int(r), channels=int(c))
            for f, s, r, c in zip(fps, size, rate, ch)]


def _assign_splits(rng: np.random.Generator, labels: list[int], fractions=SPLIT_FRACTIONS) -> np.ndarray:
    """Class-stratified train / val / test split by ``fractions``, one video of every class
    reserved for train: classes are dealt in turns (each class's videos in random order), so
    every split holds the classes in the dataset's proportions and a small test split is
    not missing a class by chance."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three shares (train, val, test) >= 0 summing to 1, "
                         f"got {list(fractions)}")
    n = len(labels)
    split = np.full(n, "train", dtype=object)
    queues: dict[int, list[int]] = {}
    for i in rng.permutation(n):
        queues.setdefault(labels[i], []).append(int(i))
    dealt: list[int] = []
    while any(queues.values()):
        for c in sorted(queues):
            if queues[c]:
                dealt.append(queues[c].pop(0))
    rest = dealt[len(queues):]  # the first turn (one video per class) stays in train
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_val = min(n_val, len(rest))
    n_test = min(n_test, len(rest) - n_val)
    split[rest[:n_test]] = "test"
    split[rest[n_test:n_test + n_val]] = "val"
    return split


def _write_all(root: Path, specs: list[VideoSpec], video_dir: str, progress: bool) -> None:
    it = specs
    if progress:
        from tqdm import tqdm
        it = tqdm(specs, desc=f"synth {video_dir}", unit="video")
    for spec in it:
        write_video(root / video_dir / f"{spec.video_id}.mp4", spec)


def _write_meta(root: Path, meta: dict) -> None:
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------- AVE
def _ave_tracks(rng: np.random.Generator, cls: int, start: int, end: int, n_classes: int) -> list[Track]:
    """Event [start,end) plus background seconds that break the audio-visual match."""
    tracks = [Track(cls, float(start), float(end), "av")]
    modes = ["none", "v", "a"] + (["v+other_a", "a+other_v"] if n_classes > 1 else [])
    for s in [s for s in range(10) if not start <= s < end]:
        mode = modes[rng.integers(len(modes))]
        other = int((cls + 1 + rng.integers(max(n_classes - 1, 1))) % n_classes)
        if mode == "v":
            tracks.append(Track(cls, s, s + 1.0, "v"))
        elif mode == "a":
            tracks.append(Track(cls, s, s + 1.0, "a"))
        elif mode == "v+other_a":
            tracks += [Track(cls, s, s + 1.0, "v"), Track(other, s, s + 1.0, "a")]
        elif mode == "a+other_v":
            tracks += [Track(cls, s, s + 1.0, "a"), Track(other, s, s + 1.0, "v")]
    return [Track(t.cls, float(t.t0), float(t.t1), t.modality) for t in tracks]


def _start(videos: int, seed: int, classes: int, max_classes: int, choices: tuple):
    """Check the arguments shared by both generators; the dataset RNG, ids and media."""
    if not 1 <= classes <= max_classes:
        raise ValueError(f"classes must be in 1..{max_classes}, got {classes}")
    if videos < 1 or seed < 0:
        raise ValueError(f"videos must be >= 1 and seed >= 0, got videos={videos}, seed={seed}")
    rng = np.random.default_rng(seed)
    ids = make_ids(rng, videos)
    return rng, ids, _media_params(rng, videos, *choices)


def plan_ave(videos: int, seed: int, classes: int | None = None, *,
             fps_choices=FPS_CHOICES, size_choices=SIZE_CHOICES, rate_choices=RATE_CHOICES,
             channel_choices=CHANNEL_CHOICES, full_event_prob: float = 0.3,
             split_fractions=SPLIT_FRACTIONS) -> tuple[list[VideoSpec], pd.DataFrame, np.ndarray]:
    """What ``make_ave`` writes, without rendering: (video specs, annotation rows, split per video)."""
    k = len(AVE_CLASSES) if classes is None else int(classes)
    rng, ids, media = _start(videos, seed, k, len(AVE_CLASSES),
                             (fps_choices, size_choices, rate_choices, channel_choices))
    labels = [int(c) for c in _balanced(rng, list(range(k)), videos)]
    rows, specs = [], []
    for i, (vid, cls, mp) in enumerate(zip(ids, labels, media)):
        vrng = np.random.default_rng([seed, i])
        if vrng.random() < full_event_prob:
            start, end = 0, 10
        else:
            length = int(vrng.integers(2, 10))
            start = int(vrng.integers(0, 10 - length + 1))
            end = start + length
        tracks = _ave_tracks(vrng, cls, start, end, k)
        specs.append(VideoSpec(vid, 10.0, tracks=tracks, seed=int(seed * 1_000_003 + i), **mp))
        rows.append(dict(category=AVE_CLASSES[cls], video_id=vid, quality="good", start=start, end=end))
    return specs, pd.DataFrame(rows), _assign_splits(rng, labels, split_fractions)


def make_ave(out: str | Path, videos: int, seed: int, classes: int | None = None, *,
             progress: bool = False, **plan) -> dict:
    """Write a synthetic AVE dataset to ``out`` in the real layout and return its metadata.

    ``out/AVE/<id>.mp4`` (10 s each), ``out/Annotations.txt`` (no header) and
    ``out/{train,val,test}_order.h5``; ``out/synthetic.json`` records every video's spec.
    ``classes`` = number of classes used (the first k of ``AVE_CLASSES``; None = all 28).
    Each video has one class and one contiguous event of >= 2 whole seconds. ``plan``:
    the keyword options of ``plan_ave`` (media choices, ``full_event_prob``, ``split_fractions``).
    """
    specs, df, split = plan_ave(videos, seed, classes, **plan)
    root = Path(out)
    write_annotations(root / "Annotations.txt", df, header=False)
    for name in ("train", "val", "test"):
        write_order_h5(root / f"{name}_order.h5", np.flatnonzero(split == name))
    _write_all(root, specs, "AVE", progress)
    k = len(AVE_CLASSES) if classes is None else int(classes)
    meta = {"format": "ave", "seed": seed, "classes": k, "videos": [s.to_dict() for s in specs],
            "splits": split.tolist()}
    _write_meta(root, meta)
    return meta


# ----------------------------------------------------------------------------- UnAV-100
def _unav_events(rng: np.random.Generator, duration: float, n_classes: int, max_events: int,
                 overlap_prob: float) -> list[tuple[int, float, float]]:
    """Events (cls, t0, t1) with float boundaries; at most two at a time, pairs may overlap."""
    events: list[tuple[int, float, float]] = []
    cursor = float(rng.uniform(0, 4))
    n_target = int(rng.integers(1, max_events + 1))
    while len(events) < n_target and cursor < duration - 1.5:
        cls = int(rng.integers(n_classes))
        t1 = min(cursor + float(rng.uniform(2, 12)), duration)
        events.append((cls, round(cursor, 3), round(t1, 3)))
        end = t1
        if n_classes > 1 and len(events) < n_target and rng.random() < overlap_prob and t1 - cursor > 1.5:
            other = int((cls + 1 + rng.integers(n_classes - 1)) % n_classes)
            o0 = cursor + float(rng.uniform(0.3, 0.8)) * (t1 - cursor)
            o1 = min(o0 + float(rng.uniform(2, 10)), duration)
            events.append((other, round(o0, 3), round(o1, 3)))
            end = max(end, o1)
        cursor = end + float(rng.uniform(0.5, 6))
    return events


def plan_unav100(videos: int, seed: int, classes: int = 5, *,
                 duration_range: tuple[float, float] = (20.0, 60.0), max_events: int = 4,
                 overlap_prob: float = 0.35, distractor_prob: float = 0.5,
                 fps_choices=FPS_CHOICES, size_choices=SIZE_CHOICES, rate_choices=RATE_CHOICES,
                 channel_choices=CHANNEL_CHOICES, split_fractions=SPLIT_FRACTIONS,
                 ) -> tuple[list[VideoSpec], dict, np.ndarray]:
    """What ``make_unav100`` writes, without rendering: (video specs, annotation database, split per video)."""
    rng, ids, media = _start(videos, seed, classes, len(UNAV_CLASSES),
                             (fps_choices, size_choices, rate_choices, channel_choices))
    specs, db, first_labels = [], {}, []
    for i, (vid, mp) in enumerate(zip(ids, media)):
        vrng = np.random.default_rng([seed, i])
        duration = round(float(vrng.uniform(*duration_range)), 2)
        events = _unav_events(vrng, duration, classes, max_events, overlap_prob)
        tracks = [Track(c, t0, t1, "av") for c, t0, t1 in events]
        # single-modality distractors in the gaps: background by the AVE definition
        busy = sorted((t0, t1) for _, t0, t1 in events)
        prev = 0.0
        for t0, t1 in busy + [(duration, duration)]:
            if t0 - prev > 2.5 and vrng.random() < distractor_prob:
                d0 = prev + 0.5
                d1 = min(d0 + float(vrng.uniform(1, 3)), t0 - 0.5)
                tracks.append(Track(int(vrng.integers(classes)), round(d0, 3), round(d1, 3),
                                    "v" if vrng.random() < 0.5 else "a"))
            prev = max(prev, t1)
        specs.append(VideoSpec(vid, duration, tracks=tracks, seed=int(seed * 1_000_003 + i), **mp))
        db[vid] = {"duration": duration, "annotations": [
            {"segment": [t0, t1], "label": UNAV_CLASSES[c], "label_id": c} for c, t0, t1 in events]}
        first_labels.append(events[0][0] if events else -1)
    split = _assign_splits(rng, first_labels, split_fractions)
    for vid, s in zip(ids, split):
        db[vid]["subset"] = s
    return specs, db, split


def make_unav100(out: str | Path, videos: int, seed: int, classes: int = 5, *, progress: bool = False,
                 **plan) -> dict:
    """Write a synthetic UnAV-100 dataset to ``out`` in the real layout; return its metadata.

    ``out/raw_videos/<id>.mp4`` and ``out/annotations/unav100_annotations.json`` (labels and
    label_ids of the first ``classes`` UnAV-100 classes). Videos last ``duration_range`` s and
    hold 1..``max_events`` events with float boundaries; overlapping events show both pictures
    side by side and mix both sounds. Gaps may hold single-modality distractors (background).
    ``plan``: the keyword options of ``plan_unav100``.
    """
    specs, db, split = plan_unav100(videos, seed, classes, **plan)
    root = Path(out)
    write_unav100(root / "annotations" / "unav100_annotations.json", db)
    _write_all(root, specs, "raw_videos", progress)
    meta = {"format": "unav100", "seed": seed, "classes": classes, "videos": [s.to_dict() for s in specs],
            "splits": split.tolist()}
    _write_meta(root, meta)
    return meta


def make(fmt: str, out: str | Path, videos: int, seed: int, **kwargs) -> dict:
    """Entry point of ``avepipe synth --format ave|unav100 --out DIR --videos N --seed S``."""
    if fmt == "ave":
        return make_ave(out, videos, seed, **kwargs)
    if fmt == "unav100":
        return make_unav100(out, videos, seed, **kwargs)
    raise ValueError(f"unknown synthetic format {fmt!r} (expected 'ave' or 'unav100')")
