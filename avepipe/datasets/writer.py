"""Write real mp4 containers (h264 video + AAC audio) with PyAV.

Used by the synthetic dataset generator and by tests that need odd media
(portrait, 4:4:4, 5.1 audio, no audio stream, ...).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_AUDIO_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def write_mp4(
    path: str | Path,
    video: np.ndarray | None,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 44100,
    *,
    pix_fmt: str = "yuv420p",
    crf: int = 28,
    audio_codec: str = "aac",
    frame_times: np.ndarray | None = None,
) -> Path:
    """Encode ``video`` (F,H,W,3 uint8 RGB) and ``audio`` (C,S float in [-1,1]).

    ``frame_times`` (seconds, increasing) gives explicit presentation times for a
    variable-frame-rate stream; by default frame i is shown at i/fps.
    Either stream may be None (for audio-less / video-less test files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        vstream = astream = None
        if video is not None:
            rate = Fraction(fps).limit_denominator(1001)
            vstream = container.add_stream("libx264", rate=rate)
            vstream.width, vstream.height = int(video.shape[2]), int(video.shape[1])
            vstream.pix_fmt = pix_fmt
            vstream.options = {"crf": str(crf), "preset": "ultrafast", "tune": "zerolatency"}
            vstream.thread_type = "AUTO"
            if frame_times is not None:
                vstream.codec_context.time_base = Fraction(1, 1000)
        if audio is not None:
            channels = int(audio.shape[0])
            astream = container.add_stream(audio_codec, rate=int(sample_rate))
            astream.layout = _AUDIO_LAYOUTS.get(channels, f"{channels}c")
        if vstream is not None:
            for i, img in enumerate(video):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if frame_times is not None:
                    frame.pts = int(round(frame_times[i] * 1000))
                    frame.time_base = Fraction(1, 1000)
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        if astream is not None:
            pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
            frame_size = astream.codec_context.frame_size or 1024
            pts = 0
            for start in range(0, pcm.shape[1], frame_size):
                chunk = np.ascontiguousarray(pcm[:, start:start + frame_size])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=astream.layout.name)
                frame.sample_rate = int(sample_rate)
                frame.pts = pts
                pts += chunk.shape[1]
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path
