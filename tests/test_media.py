"""avepipe.media: probing, frame selection by presentation time, audio, bad input."""
from __future__ import annotations


import av
import numpy as np
import pytest
from scipy.signal import resample_poly

import media_cases as mc
from avepipe import media
from avepipe.datasets.writer import write_mp4


def _peak_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


def test_segment_times_are_subinterval_centres():
    t = media.segment_times(3, 4)
    expected = [k + (j + 0.5) / 4 for k in range(3) for j in range(4)]
    np.testing.assert_allclose(t, expected)
    np.testing.assert_allclose(media.segment_times(2, 1, segment_seconds=0.5), [0.25, 0.75])
    with pytest.raises(ValueError):
        media.segment_times(2, 0)


def test_probe_facts(tmp_path):
    p = mc.av_clip(tmp_path / "a.mp4", 3.0, fps=8, size=(48, 64), rate=16000, channels=2)
    info = media.probe(p)
    assert info["has_video"] and info["has_audio"]
    assert info["duration"] == pytest.approx(3.0, abs=0.05)
    assert info["fps"] == pytest.approx(8.0)
    assert (info["width"], info["height"], info["pix_fmt"]) == (64, 48, "yuv420p")
    assert (info["audio_rate"], info["audio_channels"]) == (16000, 2)
    assert info["n_frames_est"] == 24


def test_cfr_frames_selected_by_pts_including_stream_end(tmp_path):
    fps, n = 25.0, 120
    p = mc.write_mp4(tmp_path / "idx.mp4", mc.index_frames(n), fps, mc.sine(440, n / fps, 16000), 16000, crf=18)
    # every frame's start, just before the next one, and times past the end
    times = np.concatenate([np.arange(n) / fps, (np.arange(n) + 0.99) / fps, [n / fps + 0.5, 100.0]])
    expected = np.minimum(np.floor(np.round(times * fps, 6)), n - 1).astype(int)
    frames = media.read_frames(p, times)
    assert frames.shape == (len(times), 48, 64, 3) and frames.dtype == np.uint8
    assert [mc.frame_index(f) for f in frames] == expected.tolist()


def test_frames_in_any_order_and_resized(tmp_path):
    p = mc.av_clip(tmp_path / "a.mp4", 4.0, fps=8)
    times = np.array([3.9, 0.0, 1.3, 1.3, 0.2, -1.0])  # unsorted, repeated, before the start
    frames = media.read_frames(p, times, size=(224, 100))
    assert frames.shape == (6, 224, 100, 3)
    assert [mc.frame_index(f) for f in frames] == [31, 0, 10, 10, 1, 0]


def test_vfr_frames_selected_by_presentation_time(tmp_path):
    ft = np.array([0.0, 0.1, 0.15, 0.5, 0.55, 1.3, 1.31, 1.9])
    p = mc.vfr(tmp_path / "vfr.mp4", ft, 2.0)
    times = np.array([0.0, 0.09, 0.1, 0.149, 0.15, 0.6, 1.0, 1.305, 1.31, 1.5, 1.95, 5.0])
    expected = np.searchsorted(ft, times, side="right") - 1  # largest pts <= t
    got = [mc.frame_index(f) for f in media.read_frames(p, times)]
    assert got == expected.tolist()


def test_sine_44k_stereo_to_16k_and_32k_mono(tmp_path):
    freq, secs = 1000.0, 2.0
    p = mc.write_mp4(tmp_path / "s.mp4", mc.index_frames(16), 8.0, mc.sine(freq, secs, 44100), 44100)
    out = media.read_audio(p, [16000, 32000])
    # independent reference: PyAV decode + channel mean + scipy polyphase resampling
    with av.open(str(p)) as c:
        native = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1).mean(axis=0)
    for rate in (16000, 32000):
        y = out[rate]
        assert y.dtype == np.float32 and y.ndim == 1
        assert len(y) == pytest.approx(secs * rate, abs=rate * 0.001)
        assert _peak_freq(y, rate) == pytest.approx(freq, abs=2.0)
        mid = slice(rate // 4, len(y) - rate // 4)
        assert np.sqrt(np.mean(y[mid] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
        ref = resample_poly(native, rate, 44100)[: len(y)]
        assert np.corrcoef(y[mid], ref[mid])[0, 1] > 0.999


def test_downmix_is_channel_mean(tmp_path):
    left = mc.sine(440, 2.0, 16000, channels=1)[0]
    right = mc.sine(1200, 2.0, 16000, channels=1)[0]
    p = mc.write_mp4(tmp_path / "lr.mp4", None, 8.0, np.stack([left, right]), 16000)
    y = media.read_audio(p, [16000])[16000]
    spec = np.abs(np.fft.rfft(y[4000:-4000]))
    f = np.fft.rfftfreq(len(y) - 8000, 1 / 16000)
    a440, a1200 = spec[np.argmin(abs(f - 440))], spec[np.argmin(abs(f - 1200))]
    assert a440 == pytest.approx(a1200, rel=0.1)  # both channels, equal weight
    assert np.sqrt(np.mean(y[4000:-4000] ** 2)) == pytest.approx(0.5 / 2, rel=0.1)  # each at half level


@pytest.mark.parametrize("rate,channels", [(8000, 1), (48000, 6)])
def test_odd_audio_layouts(tmp_path, rate, channels):
    p = mc.av_clip(tmp_path / "a.mp4", 2.0, rate=rate, channels=channels, freq=300.0)
    info = media.probe(p)
    assert (info["audio_rate"], info["audio_channels"]) == (rate, channels)
    out = media.read_audio(p, [16000, 32000])
    for r, y in out.items():
        assert len(y) == pytest.approx(2.0 * r, abs=r * 0.001)
        assert _peak_freq(y, r) == pytest.approx(300.0, abs=2.0)


@pytest.mark.parametrize("size,pix_fmt", [((233, 317), "yuv444p"), ((640, 360), "yuv420p")])
def test_odd_and_portrait_video(tmp_path, size, pix_fmt):
    p = mc.av_clip(tmp_path / "v.mp4", 2.0, size=size, pix_fmt=pix_fmt)
    info = media.probe(p)
    assert (info["height"], info["width"], info["pix_fmt"]) == (*size, pix_fmt)
    frames = media.read_frames(p, [0.0, 1.0, 1.9])
    assert frames.shape == (3, *size, 3)
    assert [mc.frame_index(f) for f in frames] == [0, 8, 15]
    assert media.read_frames(p, [1.0], size=(224, 224)).shape == (1, 224, 224, 3)


@pytest.mark.parametrize("build,call,reason", [
    (mc.random_bytes, "probe", "unreadable container"),
    (mc.truncated, "probe", "unreadable container"),
    (mc.truncated_faststart, "frames", "truncated or corrupt"),
    (mc.no_audio, "audio", "no audio stream"),
    (mc.no_video, "frames", "no video stream"),
    (None, "probe", "file missing"),
])
def test_bad_input_raises_media_error_naming_file(tmp_path, build, call, reason):
    path = tmp_path / "bad.mp4"
    if build is not None:
        build(path)
    fn = {"probe": lambda: media.probe(path), "audio": lambda: media.read_audio(path, [16000]),
          "frames": lambda: media.read_frames(path, [0.5, 3.5])}[call]
    with pytest.raises(media.MediaError) as err:
        fn()
    assert err.value.path == str(path) and reason in err.value.reason
    assert str(path) in str(err.value)


def test_truncated_index_first_file_opens_but_fails_to_decode(tmp_path):
    p = mc.truncated_faststart(tmp_path / "t.mp4")
    assert media.probe(p)["duration"] == pytest.approx(4.0, abs=0.05)  # header promises 4 s
    with pytest.raises(media.MediaError, match="truncated"):
        media.read_audio(p, [16000])


# ----------------------------------------------------------------- frames by decode index
def test_frames_by_decode_index(tmp_path):
    """Index k = the k-th frame the decoder returns; any order, repeats, resize; the count
    is of frames decoded."""
    p = write_mp4(tmp_path / "v.mp4", mc.index_frames(30, 48, 64), 12, crf=10)
    assert media.count_frames(p) == 30
    frames = media.read_frames_by_index(p, np.array([29, 0, 7, 7, 13]))
    assert frames.shape == (5, 48, 64, 3)
    assert [mc.frame_index(f) for f in frames] == [29, 0, 7, 7, 13]
    # the same pixels as a plain PyAV decode of those frames
    with av.open(str(p)) as c:
        direct = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(frames[0], direct[29]) and np.array_equal(frames[2], direct[7])
    assert media.read_frames_by_index(p, [3], size=(224, 224)).shape == (1, 224, 224, 3)
    assert media.read_frames_by_index(p, []).shape[0] == 0
    with pytest.raises(media.MediaError, match="frame index 30 requested but the video decodes to 30 frames"):
        media.read_frames_by_index(p, [2, 30])
    with pytest.raises(ValueError, match=">= 0"):
        media.read_frames_by_index(p, [-1])


def test_frames_by_index_on_vfr_counts_frames_not_time(tmp_path):
    times = np.array([0.0, 0.1, 0.15, 0.9, 1.0, 1.7])
    p = write_mp4(tmp_path / "vfr.mp4", mc.index_frames(6), 10, crf=10, frame_times=times)
    assert media.count_frames(p) == 6
    assert [mc.frame_index(f) for f in media.read_frames_by_index(p, [5, 3, 2])] == [5, 3, 2]


@pytest.mark.parametrize("build,reason", [(mc.no_video, "no video stream"), (mc.random_bytes, "unreadable"),
                                          (None, "file missing")])
def test_frame_readers_bad_input(tmp_path, build, reason):
    """count_frames, read_frames_by_index and select_frames name the file and the reason."""
    path = tmp_path / "bad.mp4"
    if build is not None:
        build(path)
    for fn in (lambda: media.count_frames(path), lambda: media.read_frames_by_index(path, [0]),
               lambda: media.select_frames(path, times={"t": [0.5]})):
        with pytest.raises(media.MediaError) as err:
            fn()
        assert err.value.path == str(path) and reason in err.value.reason


# ----------------------------------------------------------------- several selections in one pass
def test_select_frames_one_pass_equals_the_single_purpose_readers(tmp_path):
    p = write_mp4(tmp_path / "v.mp4", mc.index_frames(30, 48, 64), 12, crf=10)
    times = np.array([2.4, 0.0, 1.3, 1.3, 0.2, -1.0, 100.0])  # unsorted, repeated, before / past the ends
    idx = np.array([29, 0, 7, 7, 13])
    sel = media.select_frames(p, times={"t": times}, index_plans={"i": lambda n: idx if n == 30 else None})
    np.testing.assert_array_equal(sel["t"].frames[sel["t"].take], media.read_frames(p, times))
    np.testing.assert_array_equal(sel["i"].frames[sel["i"].take], media.read_frames_by_index(p, idx))
    # each chosen frame once, in decode order
    assert sel["i"].positions.tolist() == [0, 7, 13, 29] and len(sel["i"].frames) == 4
    assert [mc.frame_index(f) for f in sel["t"].frames] == sel["t"].positions.tolist() == [0, 2, 15, 28, 29]
    # a transform (e.g. the recipe's resize) sees stacked RGB frames
    half = media.select_frames(p, times={"t": times}, transforms={"t": lambda f: f[:, ::2, ::2]})["t"]
    np.testing.assert_array_equal(half.frames, sel["t"].frames[:, ::2, ::2])


def test_select_frames_without_a_declared_count_reads_by_index_in_a_second_pass(tmp_path):
    """A Matroska file declares no frame count: the pass counts the frames it decodes and
    picks the frames of the plan for that count in a second pass."""
    path = tmp_path / "v.mkv"
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"crf": "10"}
        for img in mc.index_frames(20, 48, 64):
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    with av.open(str(path)) as c:
        assert not c.streams.video[0].frames  # nothing declared
    seen = []

    def plan(n):
        seen.append(n)
        return np.arange(0, n, 6)

    sel = media.select_frames(path, index_plans={"i": plan})["i"]
    assert seen == [20] and [mc.frame_index(f) for f in sel.frames[sel.take]] == [0, 6, 12, 18]
    with pytest.raises(media.MediaError, match="frame index 25 requested but the video decodes to 20 frames"):
        media.select_frames(path, index_plans={"i": lambda n: [25]})
