"""Synthetic AVE / UnAV-100 generator: layout, parsability, media variety, content, determinism."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from avepipe.datasets.ave import read_annotations, read_splits
from avepipe.datasets.index import build_index
from avepipe.datasets.labels import AVE_CLASSES
from avepipe.datasets.synthetic import (
    AUDIO_BAND_HZ,
    CHANNEL_CHOICES,
    FPS_CHOICES,
    RATE_CHOICES,
    SIZE_CHOICES,
    Track,
    VideoSpec,
    class_style,
    make_ave,
    make_unav100,
    plan_ave,
    plan_unav100,
    render,
    render_audio,
    render_video,
)
from avepipe.datasets.unav100 import UNAV_CLASSES, read_unav100

YT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{10}$")
SMALL = dict(size_choices=((160, 120),), fps_choices=(24.0,), rate_choices=(16000,), channel_choices=(1,))


# ---------------------------------------------------------------- independent detectors
def colour_fraction(frame: np.ndarray, cls: int) -> float:
    """Share of pixels within 40 levels (every channel) of the class colour or its dark stripe."""
    c = np.asarray(class_style(cls).colour, dtype=float)
    f = frame.astype(float)
    near = (np.abs(f - c).max(-1) < 40) | (np.abs(f - 0.7 * c).max(-1) < 40)
    return float(near.mean())


def tone_share(x: np.ndarray, sr: int, f0: float, t0: float, t1: float) -> float:
    """Share of the power of x[t0:t1] within 5 Hz of f0 (Hann-windowed periodogram)."""
    seg = x[int(t0 * sr):int(t1 * sr)]
    p = np.abs(np.fft.rfft(seg * np.hanning(len(seg)))) ** 2
    f = np.fft.rfftfreq(len(seg), 1 / sr)
    return float(p[np.abs(f - f0) <= 5].sum() / p.sum())


def decode(path: Path, times) -> tuple[dict[float, np.ndarray], np.ndarray, int]:
    """({t: rgb frame shown nearest t}, mono audio, sample rate) decoded with PyAV."""
    best: dict[float, tuple[float, object]] = {}
    with av.open(str(path)) as c:
        for fr in c.decode(video=0):
            for t in times:  # convert only the frames we look at
                if t not in best or abs(fr.time - t) < best[t][0]:
                    best[t] = (abs(fr.time - t), fr)
        frames = {t: fr.to_ndarray(format="rgb24") for t, (_, fr) in best.items()}
    with av.open(str(path)) as c:
        sr = c.streams.audio[0].rate
        audio = np.concatenate([fr.to_ndarray() for fr in c.decode(audio=0)], axis=1).mean(0)
    return frames, audio, sr


def covered(tracks: list[Track], cls: int, t: float, modality: str) -> bool:
    return any(tr.cls == cls and modality in tr.modality and tr.t0 <= t < tr.t1 for tr in tracks)


# ---------------------------------------------------------------- AVE
@pytest.fixture(scope="module")
def ave(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_ave")
    meta = make_ave(root, videos=4, seed=7, classes=2)
    return root, meta


def test_ave_layout_and_parse(ave):
    root, meta = ave
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    ids = [v["video_id"] for v in meta["videos"]]
    assert files == sorted([f"AVE/{i}.mp4" for i in ids] + ["Annotations.txt", "synthetic.json",
                                                             "train_order.h5", "val_order.h5", "test_order.h5"])
    assert all(YT_ID.match(i) for i in ids) and len(set(ids)) == 4
    first = (root / "Annotations.txt").read_text().splitlines()[0]
    assert first.split("&")[0] in AVE_CLASSES  # no header line, as the repo copy
    df, problems = read_annotations(root / "Annotations.txt")
    assert problems == [] and len(df) == 4 and df["video_id"].tolist() == ids
    assert set(df["label"]) == {0, 1}
    assert ((df["end"] - df["start"]) >= 2).all()
    split = read_splits(root, len(df))
    counts = Counter(split)
    assert counts["val"] >= 1 and counts["test"] >= 1 and counts["train"] >= 2
    assert set(df.loc[split == "train", "label"]) == {0, 1}  # every class in train
    index, problems = build_index("ave", root, n_shards=2)
    assert problems == [] and index["exists"].all()


def test_ave_media_varied(ave):
    root, meta = ave
    seen = []
    for v in meta["videos"]:
        with av.open(str(root / "AVE" / f"{v['video_id']}.mp4")) as c:
            vs, aus = c.streams.video[0], c.streams.audio[0]
            assert vs.codec_context.name == "h264" and aus.codec_context.name == "aac"
            assert (vs.width, vs.height) == (v["width"], v["height"])
            assert vs.average_rate == Fraction(v["fps"]).limit_denominator(1001)
            assert (aus.rate, aus.channels) == (v["sample_rate"], v["channels"])
            assert abs(c.duration / 1e6 - 10.0) < 0.1
            seen.append(((vs.width, vs.height), float(vs.average_rate), aus.rate, aus.channels))
    # four videos cover every listed choice (the generator cycles through shuffled blocks)
    assert {s[0] for s in seen} == set(SIZE_CHOICES)
    assert {round(s[1], 2) for s in seen} == {round(f, 2) for f in FPS_CHOICES}
    assert {s[2] for s in seen} == set(RATE_CHOICES) and {s[3] for s in seen} == set(CHANNEL_CHOICES)


def test_ave_event_seconds_carry_both_modalities(ave):
    root, meta = ave
    df, _ = read_annotations(root / "Annotations.txt")
    unimodal_bg = 0
    for v, row in zip(meta["videos"], df.itertuples()):
        spec = VideoSpec.from_dict(v)
        frames, audio, sr = decode(root / "AVE" / f"{spec.video_id}.mp4", [s + 0.5 for s in range(10)])
        f0 = class_style(row.label).f0
        for s in range(10):
            seen = colour_fraction(frames[s + 0.5], row.label) > 0.01
            heard = tone_share(audio, sr, f0, s + 0.2, s + 0.8) > 0.1
            # the decoded media agree with the generator's plan ...
            assert seen == covered(spec.tracks, row.label, s + 0.5, "v"), (spec.video_id, s)
            assert heard == covered(spec.tracks, row.label, s + 0.5, "a"), (spec.video_id, s)
            # ... and with the annotation: event second <=> picture AND sound of the class
            assert (seen and heard) == (row.start <= s < row.end), (spec.video_id, s)
            unimodal_bg += seen != heard
    assert unimodal_bg > 0  # background seconds do include picture-only / sound-only cases


def test_detectors_separate_levels(ave):
    """The thresholds above sit far from the measured levels (guards against a vacuous test)."""
    root, meta = ave
    v = VideoSpec.from_dict(meta["videos"][0])
    df, _ = read_annotations(root / "Annotations.txt")
    cls = int(df["label"][0])
    frames, audio, sr = decode(root / "AVE" / f"{v.video_id}.mp4", [s + 0.5 for s in range(10)])
    on = [s for s in range(10) if covered(v.tracks, cls, s + 0.5, "a")]
    off = [s for s in range(10) if not covered(v.tracks, cls, s + 0.5, "a")]
    shares_on = [tone_share(audio, sr, class_style(cls).f0, s + 0.2, s + 0.8) for s in on]
    shares_off = [tone_share(audio, sr, class_style(cls).f0, s + 0.2, s + 0.8) for s in off]
    assert min(shares_on) > 0.25
    assert not shares_off or max(shares_off) < 0.03
    vis = [colour_fraction(frames[s + 0.5], cls) for s in range(10)
           if covered(v.tracks, cls, s + 0.5, "v")]
    assert min(vis) > 0.03


def test_ave_objects_are_large(ave):
    """An event second shows the class's object over > 14% of the decoded frame:
    encoders with random weights (the demo) barely register a small one."""
    root, meta = ave
    df, _ = read_annotations(root / "Annotations.txt")
    for v, row in zip(meta["videos"], df.itertuples()):
        t = row.start + 0.5
        frames, _, _ = decode(root / "AVE" / f"{v['video_id']}.mp4", [t])
        assert colour_fraction(frames[t], row.label) > 0.14, (v["video_id"], v["width"], v["height"])


@pytest.mark.parametrize("size", SIZE_CHOICES)
def test_every_shape_is_large(size):
    """Every class's shape (the thinnest included) covers > 14% of every frame size (objects
    of 0.4 x the short side, the generator's former size, cover < 10%)."""
    w, h = size
    for cls in range(6):  # the six shapes
        spec = VideoSpec("x" * 11, 0.5, 24.0, w, h, 16000, 1, [Track(cls, 0.0, 0.5, "v")], seed=cls)
        frames = render_video(spec)
        assert min(colour_fraction(f, cls) for f in frames) > 0.14, (cls, class_style(cls).shape, size)


def test_sound_is_band_limited_and_rate_independent():
    """Every sound (tone partials and hiss) stays below AUDIO_BAND_HZ at every sample rate, so
    a class sounds the same in a 16-kHz and a 48-kHz file (a 32-kHz encoder would otherwise
    see the file's band edge before the class)."""
    # a class with a partial between the band limit and the Nyquist frequency of 48 kHz
    cls = next(c for c in range(28) if AUDIO_BAND_HZ < max(class_style(c).partials) * class_style(c).f0 < 20000)
    st = class_style(cls)
    present = {}
    for rate in (16000, 48000):
        spec = VideoSpec("x" * 11, 2.0, 24.0, 160, 120, rate, 1, [Track(cls, 0.0, 2.0, "a")], seed=3)
        x = render_audio(spec)[0].astype(np.float64)
        p = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
        f = np.fft.rfftfreq(len(x), 1 / rate)
        assert p[f > AUDIO_BAND_HZ + 500].sum() < 1e-4 * p.sum(), rate
        present[rate] = [k for k in st.partials if p[np.abs(f - k * st.f0) <= 5].sum() > 1e-3 * p.sum()]
    assert present[16000] == present[48000]
    assert len(present[48000]) < len(st.partials)  # the partial above the band is left out at 48 kHz too


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (1.2, -0.1, -0.1)])
def test_bad_split_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        plan_ave(12, seed=0, classes=2, split_fractions=fractions)


def test_splits_stratified_by_class():
    """Each split holds the classes in the dataset's proportions (dealt in turns), so a small
    test split is not missing a class; every class keeps a train video; sizes follow the fractions."""
    specs, df, split = plan_ave(40, seed=0, classes=4, split_fractions=(0.5, 0.1, 0.4))
    assert Counter(split) == {"train": 20, "val": 4, "test": 16}
    for name, n in (("train", 20), ("val", 4), ("test", 16)):
        per_class = Counter(df.loc[split == name, "category"])
        assert len(per_class) == 4 and max(per_class.values()) - min(per_class.values()) <= 1, (name, per_class)
    _, db, usplit = plan_unav100(12, seed=1, classes=4, duration_range=(20.0, 22.0))
    assert Counter(usplit)["test"] >= 1 and Counter(usplit)["val"] >= 1
    assert [db[v]["subset"] for v in db] == list(usplit)


def test_plan_is_what_make_writes(ave):
    root, meta = ave
    specs, df, split = plan_ave(4, seed=7, classes=2)
    assert [s.to_dict() for s in specs] == meta["videos"] and split.tolist() == meta["splits"]
    written, _ = read_annotations(root / "Annotations.txt")
    assert written["video_id"].tolist() == df["video_id"].tolist()
    assert (written["start"].to_numpy() == df["start"].to_numpy()).all()


def test_ave_deterministic(tmp_path):
    def digest(root: Path) -> dict:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    make_ave(tmp_path / "a", videos=2, seed=11, classes=2, **SMALL)
    make_ave(tmp_path / "b", videos=2, seed=11, classes=2, **SMALL)
    make_ave(tmp_path / "c", videos=2, seed=12, classes=2, **SMALL)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) == 7
    assert set(a) != set(c)  # another seed gives other ids


# ---------------------------------------------------------------- UnAV-100
@pytest.fixture(scope="module")
def unav(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_unav")
    meta = make_unav100(root, videos=2, seed=5, classes=4, duration_range=(20.0, 22.0), overlap_prob=1.0,
                        max_events=3, size_choices=((320, 240),), fps_choices=(25.0,), rate_choices=(16000,))
    return root, meta


def test_unav_layout_and_parse(unav):
    root, meta = unav
    ids = [v["video_id"] for v in meta["videos"]]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted([f"raw_videos/{i}.mp4" for i in ids] +
                           ["annotations/unav100_annotations.json", "synthetic.json"])
    df, classes, problems = read_unav100(root / "annotations" / "unav100_annotations.json")
    assert problems == [] and df["video_id"].tolist() == ids and classes == list(UNAV_CLASSES)
    assert df["duration"].between(20, 22).all()
    events = [json.loads(e) for e in df["events"]]
    assert all(len(e) >= 1 for e in events)
    flat = [e for ev in events for e in ev]
    assert {e["label_id"] for e in flat} <= {0, 1, 2, 3}
    assert any(t != int(t) for e in flat for t in e["segment"])  # float boundaries
    index, problems = build_index("unav100", root, n_shards=2)
    assert problems == [] and index["exists"].all()
    for v in meta["videos"]:
        with av.open(str(root / "raw_videos" / f"{v['video_id']}.mp4")) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            assert c.streams.audio[0].codec_context.name == "aac"
            assert abs(c.duration / 1e6 - v["duration"]) < 0.1


def test_unav_overlap_shows_both(unav):
    root, meta = unav
    df, _, _ = read_unav100(root / "annotations" / "unav100_annotations.json")
    checked = 0
    for v, ev_text in zip(meta["videos"], df["events"]):
        ev = json.loads(ev_text)
        pairs = []
        for i, a in enumerate(ev):
            for b in ev[i + 1:]:
                t0, t1 = max(a["segment"][0], b["segment"][0]), min(a["segment"][1], b["segment"][1])
                if t1 - t0 >= 0.8:
                    pairs.append((a, b, (t0 + t1) / 2))
        frames, audio, sr = decode(root / "raw_videos" / f"{v['video_id']}.mp4", [m for _, _, m in pairs])
        for a, b, mid in pairs:
            frame = frames[mid]
            for e in (a, b):
                assert colour_fraction(frame, e["label_id"]) > 0.01
                assert tone_share(audio, sr, class_style(e["label_id"]).f0, mid - 0.3, mid + 0.3) > 0.05
            # the two pictures sit side by side: each half holds one colour
            w = frame.shape[1]
            left = [colour_fraction(frame[:, : w // 2], e["label_id"]) for e in (a, b)]
            right = [colour_fraction(frame[:, w // 2:], e["label_id"]) for e in (a, b)]
            assert max(left) > 0.01 and max(right) > 0.01 and np.argmax(left) != np.argmax(right)
            checked += 1
    assert checked >= 1


# ---------------------------------------------------------------- class signatures and arrays
def test_class_signatures_distinct():
    styles = [class_style(c) for c in range(len(UNAV_CLASSES))]
    sigs = {(s.colour, s.shape, round(s.f0, 1), s.partials) for s in styles}
    assert len(sigs) == 100
    f0 = sorted(s.f0 for s in styles[:28])
    assert min(np.diff(f0)) > 3.0 and 200 <= f0[0] and f0[-1] <= 1600
    cols = np.array([s.colour for s in styles[:4]], float)
    assert min(np.abs(cols[i] - cols[j]).max() for i in range(4) for j in range(i + 1, 4)) > 80


def test_render_arrays_follow_tracks():
    tracks = [Track(1, 2.0, 5.0, "av"), Track(1, 6.0, 7.0, "v"), Track(2, 8.0, 9.0, "a")]
    spec = VideoSpec("xxxxxxxxxxx", 10.0, 24.0, 160, 120, 16000, 2, tracks, seed=1)
    video, audio = render(spec)
    assert video.shape == (240, 120, 160, 3) and video.dtype == np.uint8
    assert audio.shape == (2, 160000) and audio.dtype == np.float32 and np.abs(audio).max() <= 1
    mono = audio.mean(0)
    for s in range(10):
        assert (colour_fraction(video[int((s + 0.5) * 24)], 1) > 0.01) == (2 <= s < 5 or s == 6)
        assert (tone_share(mono, 16000, class_style(1).f0, s + 0.2, s + 0.8) > 0.1) == (2 <= s < 5)
        assert (tone_share(mono, 16000, class_style(2).f0, s + 0.2, s + 0.8) > 0.1) == (s == 8)


def test_synth_cli_split_option(tmp_path):
    """`avepipe synth --split` (config `data.synthetic.split`) sets the split sizes."""
    import h5py

    from avepipe.cli import main

    out = tmp_path / "ave"
    assert main(["synth", "--format", "ave", "--out", str(out), "--videos", "10", "--classes", "2",
                 "--split", "0.5", "0.2", "0.3", "--summary", str(tmp_path / "s.json")]) == 0
    sizes = {name: len(h5py.File(out / f"{name}_order.h5", "r")["order"][:]) for name in ("train", "val", "test")}
    assert sizes == {"train": 5, "val": 2, "test": 3}
    assert json.loads((tmp_path / "s.json").read_text())["split"] == [0.5, 0.2, 0.3]
