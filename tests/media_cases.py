"""Builders of odd test media (real mp4 files via ``avepipe.datasets.writer.write_mp4``).

Each helper writes one small file and returns its path. Frames can carry their
own index in their colour (``index_frames`` / ``frame_index``) so that tests can
check which frame a decoder returned.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from avepipe.datasets.writer import write_mp4

# Index -> colour code: R and G in steps of 16 (robust to yuv420 + crf rounding).
_STEP = 16


def index_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8 flat frames whose colour encodes their index (n <= 256)."""
    if n > 256:
        raise ValueError("index_frames encodes at most 256 frames")
    i = np.arange(n)
    frames = np.zeros((n, height, width, 3), np.uint8)
    frames[..., 0] = (_STEP * (i % 16) + _STEP // 2)[:, None, None]
    frames[..., 1] = (_STEP * (i // 16) + _STEP // 2)[:, None, None]
    frames[..., 2] = 128
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Inverse of ``index_frames`` for one decoded (H, W, 3) frame (centre pixels)."""
    h, w = frame.shape[:2]
    r, g = frame[h // 4: 3 * h // 4, w // 4: 3 * w // 4, :2].reshape(-1, 2).mean(axis=0)
    return int(round((r - _STEP // 2) / _STEP)) + 16 * int(round((g - _STEP // 2) / _STEP))


def sine(freq: float, seconds: float, rate: int, channels: int = 2, amp: float = 0.5) -> np.ndarray:
    """(channels, S) float32 sine, the same in every channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.repeat((amp * np.sin(2 * np.pi * freq * t))[None].astype(np.float32), channels, axis=0)


def noise_video(seconds: float, fps: float, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Moving-gradient frames with a little noise (content an encoder has to work for)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for k in range(n):
        base = (x + 3 * k) % 256
        frames[k, ..., 0] = base
        frames[k, ..., 1] = (y + 2 * k) % 256
        frames[k, ..., 2] = rng.integers(0, 64, size=(height, width)) + 96
    return frames


def av_clip(path: Path, seconds: float = 10.0, *, fps: float = 8.0, size: tuple[int, int] = (48, 64),
            rate: int = 16000, channels: int = 1, freq: float = 440.0, pix_fmt: str = "yuv420p",
            silent: bool = False) -> Path:
    """A clip with index-coloured frames and a sine (or silence) of the given length.

    Mono by default: FFmpeg's AAC encoder dominates the cost of building test files.
    """
    n = int(round(seconds * fps))
    audio = sine(freq, seconds, rate, channels)
    if silent:
        audio[:] = 0.0
    return write_mp4(path, index_frames(n, *size), fps, audio, rate, pix_fmt=pix_fmt, crf=18)


def no_audio(path: Path, seconds: float = 2.0) -> Path:
    return write_mp4(path, index_frames(int(seconds * 8)), 8.0, None)


def no_video(path: Path, seconds: float = 2.0) -> Path:
    return write_mp4(path, None, 8.0, sine(440.0, seconds, 16000), 16000)


def random_bytes(path: Path, n: int = 50_000, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def truncated(path: Path, keep: float = 0.5) -> Path:
    """A valid clip cut to ``keep`` of its bytes (PyAV writes the moov index last)."""
    av_clip(path, 4.0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def vfr(path: Path, frame_times: np.ndarray, seconds: float, rate: int = 16000) -> Path:
    """Variable frame rate: frame i is shown at frame_times[i]."""
    frame_times = np.asarray(frame_times, dtype=np.float64)
    return write_mp4(path, index_frames(len(frame_times)), 10.0, sine(440.0, seconds, rate), rate,
                     crf=18, frame_times=frame_times)


def truncated_faststart(path: Path, keep: float = 0.5) -> Path:
    """A clip remuxed with its index first (``movflags=faststart``), then cut: it opens,
    its header promises 4 s, but the media data stops early."""
    import av

    src = av_clip(path.with_name(path.stem + "-src.mp4"), 4.0)
    with av.open(str(src)) as inp, av.open(str(path), "w", format="mp4",
                                          options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is None:  # demux's end-of-stream marker
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    src.unlink()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
