"""Media access with PyAV: probing, frame selection by presentation time, audio.

Conventions (contracts.md, "Media"):

* Time is presentation time, ``pts * time_base`` in seconds, with the file's own
  origin (t = 0 is pts 0; AVE/UnAV clips start there). Frames are selected by time,
  except where a recipe asks for decode positions (the AVE script's grid,
  :func:`read_frames_by_index`): those are counted here, never taken from PyAV's
  ``frame.index``, which threaded decoding gets wrong near the end of the stream
  (docs/reference.md §2) and which means nothing for a variable frame rate.
* The frame shown at time ``t`` is the one with the largest pts <= t; times before
  the first frame get the first frame, times past the last frame get the last one.
* Audio is downmixed to mono as the **mean of all channels** (5.1 included, LFE
  too) and resampled with soxr, quality 'HQ', to each requested rate; float32.
* Unreadable input raises :class:`MediaError` naming the file and the reason.

Why one long module: every PyAV call of the package is here (probe, the one-pass
:func:`read_media` of the decode stage, frames by time or position, several selections in
one pass), so container quirks and error wording are handled once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soxr
from av.video.reformatter import VideoReformatter

# Named resampler, recorded in each decoded shard's provenance.
RESAMPLER = {"name": "soxr", "quality": "HQ", "version": soxr.__version__}
# swscale filter used when frames are resized (the stored 224x224 samples).
FRAME_INTERPOLATION = "BILINEAR"


class MediaError(Exception):
    """A media file cannot be used: missing, unreadable, or lacking a stream."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file missing")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"unreadable container ({_why(exc)})") from exc


def _why(exc: BaseException) -> str:
    # FFmpeg errors carry the path in str(exc); strerror alone avoids repeating it.
    msg = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {msg}"


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _probe_container(container, path) -> dict:
    vs = container.streams.video[0] if container.streams.video else None
    as_ = container.streams.audio[0] if container.streams.audio else None
    if vs is None and as_ is None:
        raise MediaError(path, "no audio or video stream")
    durations = [d for d in (
        _seconds(vs.duration, vs.time_base) if vs is not None else None,
        _seconds(as_.duration, as_.time_base) if as_ is not None else None,
        container.duration / av.time_base if container.duration else None,
    ) if d]
    info = {
        "duration": max(durations) if durations else float("nan"),
        "has_video": vs is not None,
        "has_audio": as_ is not None,
        "fps": float("nan"), "width": 0, "height": 0, "pix_fmt": "",
        "audio_rate": 0, "audio_channels": 0, "n_frames_est": 0,
    }
    if vs is not None:
        cc = vs.codec_context
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        info.update(fps=float(rate) if rate else float("nan"), width=int(cc.width),
                    height=int(cc.height), pix_fmt=cc.format.name if cc.format else "")
        vdur = _seconds(vs.duration, vs.time_base) or info["duration"]
        est = vs.frames or (round(vdur * info["fps"]) if rate and np.isfinite(vdur) else 0)
        info["n_frames_est"] = int(est)
    if as_ is not None:
        cc = as_.codec_context
        info.update(audio_rate=int(cc.sample_rate or 0), audio_channels=int(cc.channels or 0))
    return info


def probe(path: str | Path) -> dict:
    """Stream facts from the container header (no decoding).

    Returns duration (s), fps, width, height, pix_fmt, has_video, has_audio,
    audio_rate, audio_channels, n_frames_est. Raises MediaError when the file is
    missing or unreadable or has neither stream; a missing stream is reported
    through ``has_video``/``has_audio`` (callers decide whether they need it).
    """
    with _open(path) as container:
        return _probe_container(container, path)


def segment_times(n_segments: int, per_segment: int, segment_seconds: float = 1.0) -> np.ndarray:
    """Centres of ``per_segment`` equal sub-intervals of each segment, segment-major.

    Shape (n_segments * per_segment,); reshape to (n_segments, per_segment) to group.
    E.g. per_segment=16 gives t = k + (j + 0.5) / 16 for k < n_segments, j < 16.
    """
    if n_segments < 0 or per_segment < 1 or segment_seconds <= 0:
        raise ValueError(f"bad segment grid: n_segments={n_segments}, per_segment={per_segment}, "
                         f"segment_seconds={segment_seconds}")
    k = np.arange(n_segments, dtype=np.float64)[:, None]
    j = (np.arange(per_segment, dtype=np.float64)[None, :] + 0.5) / per_segment
    return ((k + j) * segment_seconds).reshape(-1)


class _FrameSelector:
    """Assigns decoded frames (arriving in presentation order) to requested times.

    A time t is settled when the first frame with pts > t arrives: it gets the
    previous frame. Each chosen frame is converted to RGB once (swscale resizes).
    """

    def __init__(self, times: np.ndarray, size: tuple[int, int] | None):
        self.times = np.asarray(times, dtype=np.float64).reshape(-1)
        self.order = np.argsort(self.times, kind="stable")
        self.size = size
        self.pos = 0
        self.out: np.ndarray | None = None
        self.prev = None
        self.prev_rgb: np.ndarray | None = None
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.n_frames = 0
        # One reformatter for the whole pass keeps its swscale context: ~3x cheaper per frame.
        self.reformatter = VideoReformatter()

    @property
    def done(self) -> bool:
        return self.pos >= len(self.times)

    def _rgb(self, frame) -> np.ndarray:
        if self.size is not None:
            h, w = self.size
        elif self.out is not None:  # keep one shape if the stream changes size midway
            h, w = self.out.shape[1:3]
        else:
            h, w = frame.height, frame.width
        rgb = self.reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                        interpolation=FRAME_INTERPOLATION)
        return rgb.to_ndarray()

    def _assign(self, frame, until: float | None) -> None:
        rgb = None
        while self.pos < len(self.times) and (until is None or self.times[self.order[self.pos]] < until):
            if rgb is None:
                if frame is self.prev and self.prev_rgb is not None:
                    rgb = self.prev_rgb
                else:
                    rgb = self._rgb(frame)
                    if frame is self.prev:
                        self.prev_rgb = rgb
            if self.out is None:
                self.out = np.empty((len(self.times),) + rgb.shape, dtype=np.uint8)
            self.out[self.order[self.pos]] = rgb
            self.pos += 1

    def push(self, frame, t: float) -> None:
        self.n_frames += 1
        if self.first_time is None:
            self.first_time = t
            self.prev = frame
            self.prev_rgb = None
            self._assign(frame, t)  # times before the first frame get the first frame
        else:
            self._assign(self.prev, t)
            self.prev, self.prev_rgb = frame, None
        self.last_time = t

    def finish(self) -> np.ndarray:
        if self.prev is not None:
            self._assign(self.prev, None)  # times past the last frame get the last frame
        if self.out is None:
            h, w = self.size if self.size is not None else (0, 0)
            self.out = np.empty((len(self.times), h, w, 3), dtype=np.uint8)
        return self.out


@dataclass
class Decoded:
    """Everything one decode pass yields (used by the decode stage)."""

    frames: np.ndarray | None              # (len(times), H, W, 3) uint8, or None
    audio: dict[int, np.ndarray] = field(default_factory=dict)  # rate -> mono float32
    video_start: float | None = None       # pts time of the first frame
    video_end: float | None = None         # end of the last video packet (None: pass stopped early)
    n_video_frames: int = 0
    audio_duration: float | None = None    # decoded mono length / native rate (from t=0)
    audio_peak: float = 0.0                 # max |sample| of the native-rate mono mix


def read_media(path: str | Path, times: np.ndarray | None = None, size: tuple[int, int] | None = None,
           rates: list[int] | None = None, threads: int = 0) -> Decoded:
    """One sequential demux/decode pass over the video (if ``times``) and audio (if ``rates``).

    ``threads``: FFmpeg video decoder threads (0 = FFmpeg's default, one per core; the decode
    stage decodes several videos at once with one thread each, which costs less CPU).
    Raises MediaError when a needed stream is absent, nothing decodes, or the
    decoder fails. Decoding of video stops being done once every time is settled.
    """
    want_video, want_audio = times is not None, bool(rates)
    if want_video:
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        if not np.isfinite(times).all():
            raise ValueError(f"{path}: frame times must be finite")
    with _open(path) as container:
        info = _probe_container(container, path)
        if want_video and not info["has_video"]:
            raise MediaError(path, "no video stream")
        if want_audio and not info["has_audio"]:
            raise MediaError(path, "no audio stream")
        streams = []
        selector = vs = as_ = None
        if want_video:
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            if threads:
                vs.codec_context.thread_count = int(threads)
            streams.append(vs)
            selector = _FrameSelector(times, size)
        if want_audio:
            as_ = container.streams.audio[0]
            streams.append(as_)
            pcm = _PcmCollector()
            audio_t0: float | None = None
        period = 1.0 / info["fps"] if np.isfinite(info["fps"]) and info["fps"] > 0 else 0.04
        video_done = not want_video
        # pts * num / den: one correctly rounded division, so t equals the float of the
        # exact rational (t = 1.4 for pts 17920 at 1/12800; pts * float(tb) gives 1.4000000000000001).
        vnum, vden = (vs.time_base.numerator, vs.time_base.denominator) if vs is not None else (0, 1)
        packet_end = 0.0  # end of the last video packet: the stream's true end, no decoding needed
        try:
            for packet in container.demux(streams):
                if packet.stream is vs:
                    if packet.pts is not None:
                        packet_end = max(packet_end, (packet.pts + (packet.duration or 0)) * vnum / vden)
                    if video_done:
                        continue
                    # demux ends each stream with an empty packet, which flushes the decoder
                    for frame in packet.decode():
                        if frame.pts is None:  # no timestamp: assume the nominal frame period
                            selector.push(frame, (selector.last_time or 0.0) + period)
                        else:
                            selector.push(frame, frame.pts * vnum / vden)
                    if selector.done and selector.n_frames:  # at least one frame: the stream decodes
                        video_done = True
                        if not want_audio:
                            break
                else:
                    for frame in packet.decode():
                        if audio_t0 is None:
                            audio_t0 = 0.0 if frame.pts is None else float(frame.pts * as_.time_base)
                        pcm.add(frame)
        except av.FFmpegError as exc:
            # Typically a truncated file whose index (moov) promises more data than there is.
            where = f" after {packet_end:.2f} s of {info['duration']:.2f} s" if want_video else ""
            raise MediaError(path, f"decode failed{where}, truncated or corrupt ({_why(exc)})") from exc

        out = Decoded(frames=None)
        if want_video:
            if selector.n_frames == 0:
                raise MediaError(path, "no decodable video frames")
            out.frames = selector.finish()
            out.video_start, out.n_video_frames = selector.first_time, selector.n_frames
            if want_audio or not video_done:  # the whole stream was demuxed
                out.video_end = max(packet_end, selector.last_time + period)
                _check_complete(path, "video", out.video_end, _seconds(vs.duration, vs.time_base))
        if want_audio:
            mono = pcm.mono()
            if mono is None:
                raise MediaError(path, "no decodable audio")
            native = int(info["audio_rate"]) or int(as_.codec_context.sample_rate)
            mono = _align_to_zero(mono, audio_t0 or 0.0, native)
            declared = _seconds(as_.duration, as_.time_base)
            if declared and len(mono) > round(declared * native):
                mono = mono[: round(declared * native)]  # drop the AAC encoder's end padding
            out.audio_duration = len(mono) / native
            _check_complete(path, "audio", out.audio_duration, declared)
            out.audio_peak = float(np.max(np.abs(mono))) if len(mono) else 0.0
            out.audio = {int(r): _resample(mono, native, int(r)) for r in rates}
    return out


TRUNCATION_S = 0.5  # data ending this much before the header's stream duration = truncated


def _check_complete(path, kind: str, got: float, declared: float | None) -> None:
    """A file cut after its index (moov first) demuxes to a clean-looking early EOF."""
    if declared and got < declared - TRUNCATION_S:
        raise MediaError(path, f"{kind} data ends at {got:.2f} s but the header declares "
                               f"{declared:.2f} s: truncated or corrupt")


class _PcmCollector:
    """Gathers decoded audio frames as float32 channel planes and mixes them to mono.

    AAC decodes to planar float ('fltp'): its planes are read directly (an
    AudioResampler or ``to_ndarray`` per frame costs more than the AAC decode).
    Other sample formats go through an AudioResampler to 'fltp' first.
    """

    def __init__(self) -> None:
        self.planes: list[list[np.ndarray]] = []
        self.convert: av.AudioResampler | None = None

    def _take(self, frame) -> None:
        n = frame.samples
        if not self.planes:
            self.planes = [[] for _ in frame.planes]
        if len(frame.planes) != len(self.planes):
            raise ValueError(f"audio channel count changed mid-stream ({len(self.planes)} -> "
                             f"{len(frame.planes)})")
        for dst, plane in zip(self.planes, frame.planes):
            dst.append(np.frombuffer(plane, np.float32, n))

    def add(self, frame) -> None:
        if frame.format.name == "fltp":
            self._take(frame)
            return
        if self.convert is None:
            self.convert = av.AudioResampler(format="fltp")  # rate and layout kept
        for f in self.convert.resample(frame):
            self._take(f)

    def mono(self) -> np.ndarray | None:
        if self.convert is not None:
            for f in self.convert.resample(None):
                self._take(f)
        if not self.planes or not self.planes[0]:
            return None
        # Mean of the channels (documented policy); concatenation copies the frames' buffers.
        out = np.concatenate(self.planes[0])
        for ch in self.planes[1:]:
            out += np.concatenate(ch)
        if len(self.planes) > 1:
            out /= np.float32(len(self.planes))
        return out


def _align_to_zero(mono: np.ndarray, t0: float, rate: int) -> np.ndarray:
    """Make sample 0 sit at presentation time 0 (pad a late start, cut an early one)."""
    shift = int(round(t0 * rate))
    if shift > 0:
        return np.concatenate([np.zeros(shift, np.float32), mono])
    if shift < 0:
        return mono[-shift:]
    return mono


def _resample(mono: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return mono.copy()
    return soxr.resample(mono, rate_in, rate_out, quality=RESAMPLER["quality"]).astype(np.float32, copy=False)


def read_audio(path: str | Path, rates: list[int]) -> dict[int, np.ndarray]:
    """Decode all audio, mono (mean of channels), resampled to each rate (soxr HQ), float32.

    Sample 0 is presentation time 0. Raises MediaError (missing file, unreadable,
    no audio stream, nothing decodable).
    """
    if not rates:
        raise ValueError("read_audio needs at least one sample rate")
    return read_media(path, rates=list(rates)).audio


def read_frames(path: str | Path, times: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB frames displayed at ``times`` (s): uint8 (len(times), H, W, 3).

    For each t, the frame with the largest presentation time <= t (the first frame
    for t before it, the last frame for t past the end). ``size`` = (height, width)
    resizes with swscale (bilinear, aspect not kept); None keeps the stream size.
    One sequential decode pass that stops once every time is settled.
    """
    return read_media(path, times=np.asarray(times, dtype=np.float64), size=size).frames


# --------------------------------------------------------------------------- frames by index
# Some released extraction scripts pick frames by their position in the decoded sequence
# (Tian et al.'s AVE script: imageio decodes every frame, n = frames decoded). Index k here
# is the k-th frame the decoder returns, in presentation order, counted over a full
# sequential pass -- not PyAV's ``frame.index`` (see the module docstring).
def _video_frames(path: str | Path, container):
    """Decoded frames of the first video stream, in order; MediaError on decoder failure."""
    if not container.streams.video:
        raise MediaError(path, "no video stream")
    vs = container.streams.video[0]
    vs.thread_type = "AUTO"
    try:
        yield from container.decode(vs)
    except av.FFmpegError as exc:
        raise MediaError(path, f"decode failed, truncated or corrupt ({_why(exc)})") from exc


def count_frames(path: str | Path) -> int:
    """Number of video frames the decoder returns for the whole file (one decoding pass,
    no colour conversion). A file cut short counts the frames it holds (the decode stage
    reports such files). Raises MediaError (missing, unreadable, no video stream, decoder
    failure)."""
    with _open(path) as container:
        return sum(1 for _ in _video_frames(path, container))


def read_frames_by_index(path: str | Path, indices: np.ndarray,
                         size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB frames at decode positions ``indices`` (0 = first frame returned): uint8
    (len(indices), H, W, 3), in the order of ``indices`` (repeats allowed). ``size`` =
    (height, width) resizes with swscale as :func:`read_frames`; None keeps the stream size.
    One pass that stops after the largest index; each chosen frame is converted once.
    An index past the last frame raises MediaError naming the count."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and idx.min() < 0:
        raise ValueError(f"{path}: frame indices must be >= 0, got {int(idx.min())}")
    wanted = {int(k): [] for k in np.unique(idx)}
    for pos, k in enumerate(idx):
        wanted[int(k)].append(pos)
    last = max(wanted, default=-1)
    out: np.ndarray | None = None
    reformatter = VideoReformatter()  # one swscale context for the pass
    n = 0
    with _open(path) as container:
        for frame in _video_frames(path, container):
            if n in wanted:
                h, w = size if size is not None else (
                    out.shape[1:3] if out is not None else (frame.height, frame.width))
                rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                           interpolation=FRAME_INTERPOLATION).to_ndarray()
                if out is None:
                    out = np.empty((len(idx),) + rgb.shape, dtype=np.uint8)
                out[wanted[n]] = rgb
            n += 1
            if n > last:
                break
    if n <= last:
        if n == 0:
            raise MediaError(path, "no decodable video frames")
        raise MediaError(path, f"frame index {last} requested but the video decodes to {n} frames")
    if out is None:  # no index asked for
        h, w = size if size is not None else (0, 0)
        out = np.empty((0, h, w, 3), dtype=np.uint8)
    return out


# --------------------------------------------------------------------------- several selections, one pass
@dataclass
class Selection:
    """The frames one request picked: ``frames`` holds each chosen frame once (in decode
    order, after the request's ``transform``), ``take`` maps the request's positions onto it:
    the request's frame j is ``frames[take[j]]``."""

    frames: np.ndarray   # (U, H, W, 3) uint8 (or whatever the transform returns, stacked)
    take: np.ndarray     # (len(request),) int64 into frames
    positions: np.ndarray  # (U,) int64: decode position (0 = first frame returned) of each frame


class _Request:
    """One request's bookkeeping: which decode positions it wants and where they go."""

    def __init__(self, transform, chunk: int):
        self.transform, self.chunk = transform, chunk
        self.slot: dict[int, int] = {}   # decode position -> row in frames
        self.take: np.ndarray | None = None
        self.pending: list[np.ndarray] = []  # RGB frames not yet transformed
        self.done: list[np.ndarray] = []

    def want(self, pos: int, rgb) -> int:
        row = self.slot.get(pos)
        if row is None:
            row = self.slot[pos] = len(self.slot)
            self.pending.append(rgb())
            if len(self.pending) >= self.chunk:
                self.flush()
        return row

    def flush(self) -> None:
        if self.pending:
            block = np.stack(self.pending)
            self.pending = []
            self.done.append(block if self.transform is None else np.asarray(self.transform(block)))

    def result(self) -> Selection:
        self.flush()
        frames = np.concatenate(self.done) if self.done else np.empty((0, 0, 0, 3), np.uint8)
        positions = np.array(sorted(self.slot, key=self.slot.get), dtype=np.int64)
        return Selection(frames, self.take, positions)


def select_frames(path: str | Path, *, times: dict[str, np.ndarray] | None = None,
                  index_plans: dict | None = None, transforms: dict | None = None,
                  threads: int = 0, chunk: int = 16) -> dict[str, Selection]:
    """Several frame selections of one video in ONE decoding pass (the extraction stage's
    frame source; :func:`read_frames` and :func:`read_frames_by_index` pick the same frames).

    ``times``: name -> presentation times (s); each time gets the frame shown then (the
    rules of :func:`read_frames`). ``index_plans``: name -> ``plan(n)``, the decode positions
    wanted when the video decodes to ``n`` frames (e.g. the AVE script's grid). The pass
    uses the count the container declares; it counts the frames it decodes and, when the
    plan for the true count differs, reads those requests again with a second pass (a
    declared count is wrong only for odd files). ``transforms``: name -> function applied to
    stacked RGB frames (N, H, W, 3) uint8 (in blocks of ``chunk``), e.g. a resize to 224x224:
    each chosen frame is converted to RGB once, however many requests want it.
    ``threads``: FFmpeg decoder threads (0 = FFmpeg's default, one per core).

    Raises MediaError naming the file (missing, unreadable, no video stream, nothing
    decodable, decoder failure, an index past the last frame).
    """
    times = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (times or {}).items()}
    index_plans = dict(index_plans or {})
    transforms = dict(transforms or {})
    if set(times) & set(index_plans):
        raise ValueError(f"{path}: a request name is used for both times and indices: {set(times) & set(index_plans)}")
    for k, t in times.items():
        if not np.isfinite(t).all():
            raise ValueError(f"{path}: frame times of {k!r} must be finite")
    reqs = {k: _Request(transforms.get(k), chunk) for k in [*times, *index_plans]}
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        vs = container.streams.video[0]
        declared = int(vs.frames or 0)
        wanted = {k: _plan_positions(path, plan, declared) for k, plan in index_plans.items()}
        n = _select_pass(path, container, vs, reqs, times, wanted, threads,
                         stop_early=not index_plans)
    redo = {}
    for k, plan in index_plans.items():
        true = _plan_positions(path, plan, n, strict=True)
        if wanted[k] is None or not np.array_equal(true, wanted[k]):
            redo[k] = true
    if redo:  # the declared count was wrong: those requests again with the true plan
        again = {k: _Request(transforms.get(k), chunk) for k in redo}
        with _open(path) as container:
            _select_pass(path, container, container.streams.video[0], again, {}, redo, threads, stop_early=True)
        reqs.update(again)
    return {k: r.result() for k, r in reqs.items()}


def _plan_positions(path, plan, n: int, strict: bool = False) -> np.ndarray | None:
    """``plan(n)`` as int64, or None when ``n`` is unknown (0) and not ``strict``."""
    if n < 1:
        if strict:
            raise MediaError(path, "no decodable video frames")
        return None
    idx = np.asarray(plan(n), dtype=np.int64).reshape(-1)
    if len(idx) and idx.min() < 0:
        raise ValueError(f"{path}: frame indices must be >= 0, got {int(idx.min())}")
    if strict and len(idx) and idx.max() >= n:
        raise MediaError(path, f"frame index {int(idx.max())} requested but the video decodes to {n} frames")
    return idx


def _select_pass(path, container, vs, reqs: dict[str, _Request], times: dict[str, np.ndarray],
                 wanted: dict[str, np.ndarray | None], threads: int, stop_early: bool) -> int:
    """Decode ``vs`` once, filling ``reqs`` (times by presentation time, ``wanted`` by decode
    position); returns the number of frames decoded (all of them unless ``stop_early``)."""
    vs.codec_context.thread_type = "AUTO"
    if threads:
        vs.codec_context.thread_count = int(threads)
    tnum, tden = vs.time_base.numerator, vs.time_base.denominator
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    period = 1.0 / float(rate) if rate else 0.04
    order = {k: np.argsort(t, kind="stable") for k, t in times.items()}
    tpos = dict.fromkeys(times, 0)
    for k, t in times.items():
        reqs[k].take = np.zeros(len(t), np.int64)
    by_pos: dict[int, list[tuple[str, np.ndarray]]] = {}
    for k, idx in wanted.items():
        if idx is None:
            continue
        reqs[k].take = np.zeros(len(idx), np.int64)
        for pos in np.unique(idx):
            by_pos.setdefault(int(pos), []).append((k, np.flatnonzero(idx == pos)))
    last_wanted = max(by_pos, default=-1)
    reformatter = VideoReformatter()
    size: tuple[int, int] | None = None
    cache: dict[int, np.ndarray] = {}

    def rgb_of(pos: int, frame):
        def get():
            nonlocal size
            if pos not in cache:
                cache.clear()  # frames arrive in order: only the newest two are ever asked for
                h, w = size or (frame.height, frame.width)  # keep one shape if the stream changes size
                size = (h, w)
                cache[pos] = reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                                  interpolation=FRAME_INTERPOLATION).to_ndarray()
            return cache[pos]
        return get

    def settle(pos: int, frame, until: float | None) -> None:
        """Times before ``until`` (all, if None) get frame ``pos``."""
        for k, t in times.items():
            o, i = order[k], tpos[k]
            while i < len(t) and (until is None or t[o[i]] < until):
                reqs[k].take[o[i]] = reqs[k].want(pos, rgb_of(pos, frame))
                i += 1
            tpos[k] = i

    def times_done() -> bool:
        return all(tpos[k] >= len(t) for k, t in times.items())

    n, prev, last_t = 0, None, None
    try:
        for frame in container.decode(vs):
            t = (last_t or 0.0) + period if frame.pts is None else frame.pts * tnum / tden
            if prev is None:
                settle(0, frame, t)  # times before the first frame get the first frame
            else:
                settle(n - 1, prev, t)
            for k, rows in by_pos.get(n, ()):
                reqs[k].take[rows] = reqs[k].want(n, rgb_of(n, frame))
            prev, last_t = frame, t
            n += 1
            if stop_early and n > last_wanted and times_done():
                break
    except av.FFmpegError as exc:
        raise MediaError(path, f"decode failed, truncated or corrupt ({_why(exc)})") from exc
    if n == 0:
        raise MediaError(path, "no decodable video frames")
    settle(n - 1, prev, None)  # times past the last frame get the last frame
    return n
