"""Extraction stage: stored features equal a direct forward; failures are isolated; UnAV windows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr

import avepipe.encoders as encoders
from avepipe import media
from avepipe import provenance as prov
from avepipe.datasets.writer import write_mp4
from avepipe.encoders import EncoderSpec, LoadedEncoder
from avepipe.extract import (audio_chunks, audio_inputs, extract_shard, visual_frames)
from avepipe.frames import frame_times, step_starts
from avepipe.store import open_features

RATE = 16000


# ----------------------------------------------------------------- fixtures
def _video(path, seconds=3, fps=8, h=36, w=48, seed=0):
    rng = np.random.default_rng(seed)
    n = seconds * fps
    base = rng.integers(0, 255, (1, h, w, 3))
    # brightness ramps frame to frame so that picking the wrong frame changes the features
    ramp = (np.arange(n) * (200 // n))[:, None, None, None]
    frames = np.clip(base // 4 + ramp, 0, 255).astype(np.uint8)
    return write_mp4(path, frames, fps, crf=10)


def _decoded_shard(path, ids, status, reasons, n_segments, seed=0):
    """A decoded shard per contracts.md, written by hand (independent of avepipe.decode)."""
    rng = np.random.default_rng(seed)
    g = zarr.open_group(str(path), mode="w")
    for name, vals in (("video_id", ids), ("status", status), ("reason", reasons),
                       ("warnings", [""] * len(ids))):
        a = g.create_array(name, shape=(len(ids),), dtype=str)
        a[:] = np.array(vals, dtype=object)
    g.create_array("n_segments", data=np.array(n_segments, np.int32))
    maxs = max(n_segments)
    audio = rng.uniform(-1, 1, (len(ids), maxs * RATE)).astype(np.float32)
    for i, n in enumerate(n_segments):
        audio[i, n * RATE:] = 0
    g.create_array("audio_16000", data=audio, chunks=(1, maxs * RATE))
    g.attrs["provenance"] = {"code_fingerprint": "x"}
    return audio


class _FakeVisual(torch.nn.Module):
    """(N,3,28,28) -> (N,7,7,C) channels-last maps, like the real trunks."""

    def __init__(self, c=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 7).permute(0, 2, 3, 1)


def _vis_pre(frames):
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)


class _FakeAudio(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(100, 8)

    def forward(self, x):
        return self.fc(x)


def _aud_pre(chunks):
    # (N, 16000) -> (N, 100): mean of 160-sample frames (a stand-in for a spectrogram)
    return chunks[:, :16000].reshape(-1, 100, 160).mean(-1)


def _fake_spec(name, modality, fail_on_weights=False):
    def loader(spec, weights, device, **opts):
        if weights == "bad":
            raise ValueError("weights file bad: wrong keys")
        if modality == "visual":
            return LoadedEncoder(_FakeVisual(), _vis_pre, {"id": weights, "sha256": None}, {"name": "fake"})
        return LoadedEncoder(_FakeAudio(), _aud_pre, {"id": weights, "sha256": None}, {"name": "fake"})

    shape = (7, 7, 4) if modality == "visual" else (8,)
    return EncoderSpec(name, modality, shape, RATE if modality == "audio" else None, "random", loader=loader,
                       default_dtype="float16" if modality == "visual" else "float32")


@pytest.fixture
def fake_encoders(monkeypatch):
    reg = dict(encoders.ENCODERS)
    reg["fakev"] = _fake_spec("fakev", "visual")
    reg["fakea"] = _fake_spec("fakea", "audio")
    monkeypatch.setattr(encoders, "ENCODERS", reg)
    for name in ("fakev", "fakea", "fakea32"):
        monkeypatch.setitem(prov.STAGE_ENTRIES, f"extract:{name}", ["extract.py", "store.py"])
    return reg


@pytest.fixture
def media_set(tmp_path):
    """Three videos: a good one (3 s), a broken file (decode said ok), a decode failure."""
    good = _video(tmp_path / "aaa.mp4", seconds=3, seed=1)
    good2 = _video(tmp_path / "bbb.mp4", seconds=2, seed=2)
    broken = tmp_path / "ccc.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    ids = ["aaa", "bbb", "ccc", "ddd"]
    audio = _decoded_shard(tmp_path / "dec.zarr", ids, ["ok", "ok", "ok", "failed"],
                           ["", "", "", "no audio stream"], [3, 2, 3, 0])
    index = pd.DataFrame({
        "video_id": ["aaa", "aaa", "bbb", "ccc", "ddd"],  # duplicate id, as AVE rows
        "path": [str(good), str(good), str(good2), str(broken), str(tmp_path / "ddd.mp4")],
    })
    return tmp_path, index, audio


# ----------------------------------------------------------------- unit helpers
def test_step_grid_helpers():
    np.testing.assert_array_equal(step_starts(10, None, None), np.arange(10.0))
    s = step_starts(3, 0.96, 0.32)
    # starts t = k*0.32 while t + 0.96 <= 3 -> k = 0..6 (6*0.32+0.96 = 2.88; 7*0.32+0.96 = 3.2)
    np.testing.assert_allclose(s, np.arange(7) * 0.32)
    assert len(step_starts(0.5, 0.96, 0.32)) == 0
    assert len(step_starts(0.96, 0.96, 0.32)) == 1  # exact fit counts
    np.testing.assert_allclose(frame_times([0.0], 1.0, 4), [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(frame_times(np.array([2.0]), 1.0, 16), media.segment_times(3, 16)[32:])
    w = np.arange(3 * RATE, dtype=np.float32)
    c = audio_chunks(w, RATE, np.array([0.32]), 0.96)
    assert c.shape == (1, RATE)
    np.testing.assert_array_equal(c[0, :15360], w[5120:5120 + 15360])
    assert (c[0, 15360:] == 0).all()


def test_recipe_hooks_and_their_defaults(tmp_path):
    """No hook (or a hook that returns None): frames by presentation time, 1-s chunks; a hook's
    frames / rows are used as they are."""
    path = _video(tmp_path / "v.mp4", seconds=2, seed=4)
    starts = np.arange(2.0)
    default = visual_frames(None, str(path), starts, 1.0, 2, 2.0)
    np.testing.assert_array_equal(default, media.read_frames(path, frame_times(starts, 1.0, 2)))

    class Hooks:
        def __init__(self, give):
            self.give = give

        def select_frames(self, p, s, span, per_step, duration):
            assert (p, span, per_step, duration) == (str(path), 1.0, 2, 2.0)
            return self.give

        def cut_audio(self, wave, rate, s, span, windowed):
            return None if self.give is None else np.full((len(s), 7), float(windowed), np.float32)

    np.testing.assert_array_equal(visual_frames(Hooks(None), str(path), starts, 1.0, 2, 2.0), default)
    mine = np.zeros((4, 3, 5, 3), np.uint8)
    assert visual_frames(Hooks(mine), str(path), starts, 1.0, 2, 2.0) is mine
    wave = np.arange(3 * RATE, dtype=np.float32)
    np.testing.assert_array_equal(audio_inputs(Hooks(None), wave, RATE, starts, 1.0, False),
                                  audio_chunks(wave, RATE, starts, 1.0))
    np.testing.assert_array_equal(audio_inputs(Hooks(mine), wave, RATE, starts, 0.96, True),
                                  np.ones((2, 7), np.float32))


# ----------------------------------------------------------------- fake encoders
def test_visual_matches_direct_forward_and_isolates_failures(fake_encoders, media_set):
    root, index, _ = media_set
    out = extract_shard(root / "dec.zarr", index, "fakev", "random", root / "f.zarr",
                        frames_per_segment=2, batch_size=4, num_workers=1, dtype="float32",
                        progress=False)
    fs = open_features(out)
    assert list(fs.video_ids) == ["aaa", "bbb", "ccc", "ddd"]
    assert list(fs.status) == ["ok", "ok", "failed", "failed"]
    assert fs.reason[3] == "no audio stream"  # copied from decode
    assert fs.reason[2]  # broken file: a media error reason
    assert list(fs.lengths) == [3, 2, 0, 0]
    assert fs.features.shape == (4, 3, 7, 7, 4)
    got = fs.features.compute()
    model = _FakeVisual().eval()
    for row, (vid, n) in enumerate([("aaa", 3), ("bbb", 2)]):
        frames = media.read_frames(root / f"{vid}.mp4", media.segment_times(n, 2))
        with torch.no_grad():
            ref = model(_vis_pre(torch.from_numpy(frames))).reshape(n, 2, 7, 7, 4).mean(1).numpy()
        np.testing.assert_allclose(got[row, :n], ref, rtol=1e-5, atol=1e-6)
    assert (got[1, 2:] == 0).all() and (got[2:] == 0).all()
    np.testing.assert_array_equal(fs.timestamps[0], [0.0, 1.0, 2.0])
    prov = fs.attrs["provenance"]
    assert prov["encoder"] == "fakev" and prov["frames_per_segment"] == 2
    assert prov["weights"]["id"] == "random" and prov["dtype"] == "float32"
    assert len(prov["code_fingerprint"]) == 64 and "versions" in prov and "created" in prov


def test_visual_in_process_loader_and_float16_default(fake_encoders, media_set):
    root, index, _ = media_set
    out = extract_shard(root / "dec.zarr", index, "fakev", "random", root / "f16.zarr",
                        frames_per_segment=1, batch_size=2, num_workers=0, progress=False)
    fs = open_features(out)
    assert fs.features.dtype == np.float16
    assert list(fs.status) == ["ok", "ok", "failed", "failed"]


def test_audio_matches_direct_forward(fake_encoders, media_set):
    root, index, audio = media_set
    out = extract_shard(root / "dec.zarr", index, "fakea", "random", root / "a.zarr",
                        num_workers=0, dtype="float32", progress=False)
    fs = open_features(out)
    # audio comes from the decoded shard: the broken mp4 (decode said ok) is fine here
    assert list(fs.status) == ["ok", "ok", "ok", "failed"]
    model = _FakeAudio().eval()
    got = fs.features.compute()
    for row, n in enumerate([3, 2, 3]):
        with torch.no_grad():
            ref = model(_aud_pre(torch.from_numpy(audio[row, : n * RATE].reshape(n, RATE)))).numpy()
        np.testing.assert_allclose(got[row, :n], ref, rtol=1e-5, atol=1e-6)


def test_unav_windows(fake_encoders, media_set):
    root, index, audio = media_set
    kw = dict(window=0.96, hop=0.32, dtype="float32", progress=False, num_workers=0)
    fa = open_features(extract_shard(root / "dec.zarr", index, "fakea", "random", root / "ua.zarr", **kw))
    fv = open_features(extract_shard(root / "dec.zarr", index, "fakev", "random", root / "uv.zarr",
                                     frames_per_segment=2, **kw))
    # 3 s -> 7 windows, 2 s -> 4 windows (3*0.32+0.96 = 1.92 <= 2)
    assert list(fa.lengths[:2]) == [7, 4] and list(fv.lengths[:2]) == [7, 4]
    np.testing.assert_allclose(fa.timestamps[0, :7], np.arange(7) * 0.32)
    np.testing.assert_allclose(fv.timestamps[1, :4], np.arange(4) * 0.32)
    assert np.isnan(fa.timestamps[1, 4:]).all()
    # audio window k: samples [k*0.32 s, k*0.32+0.96 s) zero-padded to 1 s
    k = 5
    a0 = int(round(k * 0.32 * RATE))
    chunk = np.zeros((1, RATE), np.float32)
    chunk[0, :15360] = audio[0, a0:a0 + 15360]
    with torch.no_grad():
        ref = _FakeAudio().eval()(_aud_pre(torch.from_numpy(chunk))).numpy()[0]
    np.testing.assert_allclose(fa.features[0, k].compute(), ref, rtol=1e-5, atol=1e-6)
    # visual window k: frames at the centres of its 2 sub-intervals: k*0.32 + {0.24, 0.72}
    frames = media.read_frames(root / "aaa.mp4", np.array([k * 0.32 + 0.24, k * 0.32 + 0.72]))
    with torch.no_grad():
        ref = _FakeVisual().eval()(_vis_pre(torch.from_numpy(frames))).mean(0).numpy()
    np.testing.assert_allclose(fv.features[0, k].compute(), ref, rtol=1e-5, atol=1e-6)
    assert fa.attrs["provenance"]["window"] == 0.96 and fa.attrs["provenance"]["hop"] == 0.32


def test_bad_weights_fail_before_work(fake_encoders, media_set):
    root, index, _ = media_set
    with pytest.raises(ValueError, match="weights"):
        extract_shard(root / "dec.zarr", index, "fakev", "bad", root / "x.zarr", progress=False)
    assert not (root / "x.zarr").exists()
    assert not list(root.glob("x.zarr*"))


def test_audio_window_longer_than_input_rejected(fake_encoders, media_set):
    root, index, _ = media_set
    with pytest.raises(ValueError, match="longer"):
        extract_shard(root / "dec.zarr", index, "fakea", "random", root / "x.zarr",
                      window=2.0, hop=1.0, progress=False)


def test_missing_audio_rate_is_clear(fake_encoders, media_set, monkeypatch):
    root, index, _ = media_set
    spec = _fake_spec("fakea32", "audio")
    spec.sample_rate = 32000
    monkeypatch.setitem(encoders.ENCODERS, "fakea32", spec)
    with pytest.raises(KeyError, match="audio_32000"):
        extract_shard(root / "dec.zarr", index, "fakea32", "random", root / "x.zarr", progress=False)


# ----------------------------------------------------------------- real encoders (random weights)
def _real(name):
    if name not in encoders.ENCODERS:
        pytest.skip(f"encoder {name} not registered yet")
    return encoders.ENCODERS[name]


@pytest.fixture
def one_video(tmp_path):
    """One 2-s video in its own decoded shard (keeps the VGG-19 forward count small)."""
    path = _video(tmp_path / "vid.mp4", seconds=2, h=40, w=64, seed=3)
    audio = _decoded_shard(tmp_path / "dec1.zarr", ["vid"], ["ok"], [""], [2])
    return tmp_path, pd.DataFrame({"video_id": ["vid"], "path": [str(path)]}), audio


def _torchvision_reference(name, state):
    """The torchvision model itself, with the encoder's weights: vgg19().features / resnet50 trunk."""
    import torchvision

    if name == "vgg19":
        with torch.device("meta"):  # skip the random init of the 120M-parameter classifier
            tv = torchvision.models.vgg19()
        tv.features.load_state_dict(state, assign=True)
        return lambda x: tv.features.eval()(x).permute(0, 2, 3, 1)
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    trunk = torch.nn.Sequential(*[m for n, m in tv.named_children() if n not in ("avgpool", "fc")])
    return lambda x: trunk.eval()(x).permute(0, 2, 3, 1)


def _decoded_by_index(path, indices):
    """Frames at decode positions, straight from PyAV (independent of avepipe.media)."""
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return len(frames), np.stack([frames[i] for i in indices])


@pytest.mark.parametrize("name,fps,opts", [("vgg19", 1, {"preprocessing": "torchvision"}),
                                           ("vgg19", 2, {"preprocessing": "ave"}),
                                           ("resnet50", 2, {})])
def test_real_visual_encoder_matches_torchvision_forward(name, fps, opts, one_video):
    spec = _real(name)
    root, index, _ = one_video
    out = extract_shard(root / "dec1.zarr", index, name, "random", root / f"{name}.zarr",
                        frames_per_segment=fps, batch_size=3, num_workers=1, dtype="float32",
                        progress=False, **opts)
    fs = open_features(out)
    assert fs.features.shape == (1, 2, *spec.feature_shape) and list(fs.status) == ["ok"]
    loaded = spec.load("random", device="cpu", **opts)  # "random" = seed 0: the same weights again
    state = {k.removeprefix("features."): v for k, v in loaded.model.state_dict().items()}
    ref_model = _torchvision_reference(name, state)
    if opts.get("preprocessing") == "ave":
        # the AVE script's frames: 16 decoded frames over 2 s -> fi = 8; second l frame i of 2:
        # int(l*8 + i/2*8) = 0, 4, 8, 12
        n, frames = _decoded_by_index(root / "vid.mp4", [0, 4, 8, 12])
        assert n == 16
    else:
        frames = media.read_frames(root / "vid.mp4", media.segment_times(2, fps))
    with torch.no_grad():
        ref = ref_model(loaded.preprocess(torch.from_numpy(frames))).reshape(2, fps, *spec.feature_shape).mean(1)
    got = fs.features[0].compute()
    scale = float(ref.abs().max())
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4 * scale)
    assert fs.attrs["provenance"]["weights"]["id"] == "random"
    assert fs.attrs["provenance"]["preprocessing"]["preprocessing"] == loaded.options["preprocessing"]


@pytest.mark.parametrize("framing", ["clip", "second"])
def test_real_vggish_matches_direct_forward(one_video, framing):
    """clip: step k is the k-th 0.96-s patch of the continuous waveform (samples
    [15360k, 15360k + 15600)); second: the first 15600 samples of second k."""
    spec = _real("vggish")
    root, index, audio = one_video
    out = extract_shard(root / "dec1.zarr", index, "vggish", "random", root / "vggish.zarr",
                        num_workers=0, dtype="float32", progress=False, framing=framing)
    fs = open_features(out)
    assert fs.features.shape == (1, 2, 128)
    hop = 15360 if framing == "clip" else RATE
    rows = np.stack([audio[0, k * hop:k * hop + 15600] for k in range(2)])
    loaded = spec.load("random", device="cpu")
    with torch.no_grad():
        ref = loaded.model.eval()(loaded.preprocess(torch.from_numpy(rows))).numpy()
    np.testing.assert_allclose(fs.features[0].compute(), ref, rtol=1e-4, atol=1e-5)
    assert fs.attrs["provenance"]["preprocessing"]["framing"] == framing
    np.testing.assert_array_equal(fs.timestamps[0], [0.0, 1.0])  # steps stay the segments


@pytest.mark.parametrize("framing", ["clip", "second"])
def test_real_vggish_unav_windows(one_video, framing):
    """A 0.96-s window is one patch: clip takes 15600 samples of the continuous waveform from
    the window start; second zero-pads the 15360-sample window to 1 s."""
    root, index, audio = one_video
    out = extract_shard(root / "dec1.zarr", index, "vggish", "random", root / "vw.zarr", window=0.96, hop=0.32,
                        num_workers=0, dtype="float32", progress=False, framing=framing)
    fs = open_features(out)
    assert list(fs.lengths) == [4]
    rows = np.zeros((4, 15600), np.float32)
    for k in range(4):
        a = k * 5120
        n = 15600 if framing == "clip" else 15360
        rows[k, :n] = audio[0, a:a + n]
    loaded = _real("vggish").load("random", device="cpu")
    with torch.no_grad():
        ref = loaded.model.eval()(loaded.preprocess(torch.from_numpy(rows))).numpy()
    np.testing.assert_allclose(fs.features[0, :4].compute(), ref, rtol=1e-4, atol=1e-5)
    fit = fs.attrs["provenance"]["audio_fit"]
    assert fit.startswith("the encoder's framing")


def test_real_bad_weights_file_fails_before_work(one_video):
    _real("vgg19")
    root, index, _ = one_video
    bad = root / "not_vgg.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(Exception, match="does not match|layout"):
        extract_shard(root / "dec1.zarr", index, "vgg19", str(bad), root / "x.zarr", progress=False)
    assert not list(root.glob("x.zarr*"))
