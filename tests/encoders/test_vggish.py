"""VGGish: torch front end vs a numpy implementation of the recipe; network vs a
functional torchvggish-order forward; torchvggish key layout; PCA postprocessing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from avepipe.encoders import get_encoder
from avepipe.encoders.vggish import LogMelPatch, mel_matrix
from avepipe.encoders.weights import WeightsError

torch.set_num_threads(1)

# torchvggish state-dict layout (docs/reference.md §2.3), written out independently of the module
LAYOUT = {
    "features.0.weight": (64, 1, 3, 3), "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3), "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3), "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3), "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3), "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3), "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288), "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096), "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096), "embeddings.4.bias": (128,),
}


def np_mel_matrix() -> np.ndarray:
    """HTK mel, triangles linear in mel, DC row zeroed (the VGGish mel_features recipe)."""
    hz2mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    bins = hz2mel(np.linspace(0.0, 8000.0, 257))
    edges = np.linspace(hz2mel(125.0), hz2mel(7500.0), 64 + 2)
    w = np.empty((257, 64))
    for i in range(64):
        lo, c, hi = edges[i:i + 3]
        w[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    w[0, :] = 0.0
    return w


def np_logmel(wave: np.ndarray) -> np.ndarray:
    """All log-mel frames of a 16 kHz waveform: 400/160 framing without padding, periodic Hann,
    |rfft| with 512 points, mel, log(+0.01)."""
    win = scipy.signal.get_window("hann", 400, fftbins=True)  # periodic
    n = 1 + (len(wave) - 400) // 160
    frames = np.stack([wave[i * 160:i * 160 + 400] for i in range(n)])
    spec = np.abs(np.fft.rfft(frames * win, 512))
    return np.log(spec @ np_mel_matrix() + 0.01)


def _waves(n=3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    return np.stack([0.3 * np.sin(2 * np.pi * (220 * (k + 1)) * t) + 0.05 * rng.standard_normal(16000)
                     for k in range(n)]).astype(np.float32)


def ref_vggish(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvggish forward written with functional ops on the state dict."""
    for i, pool in ((0, True), (3, True), (6, False), (8, True), (11, False), (13, True)):
        x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        if pool:
            x = F.max_pool2d(x, 2, 2)
    x = torch.transpose(x, 1, 3)
    x = torch.transpose(x, 1, 2).contiguous().view(x.size(0), -1)
    for i in (0, 2, 4):
        x = F.relu(F.linear(x, sd[f"embeddings.{i}.weight"], sd[f"embeddings.{i}.bias"]))
    return x


def test_mel_matrix_matches_numpy_recipe():
    assert np.allclose(mel_matrix().numpy(), np_mel_matrix(), atol=1e-12)


def test_front_end_matches_numpy():
    waves = _waves()
    ours = LogMelPatch()(torch.from_numpy(waves))
    assert ours.shape == (3, 1, 96, 64)
    for k in range(3):
        ref = np_logmel(waves[k].astype(np.float64))
        assert ref.shape == (98, 64)  # 1 s gives 98 frames; the patch is the first 96
        assert np.abs(ours[k, 0].numpy() - ref[:96]).max() < 1e-3


def test_patch_uses_only_first_15600_samples_and_rejects_short_input():
    w = torch.from_numpy(_waves(1))
    w2 = w.clone()
    w2[:, 15600:] = 1.0
    front = LogMelPatch()
    assert torch.equal(front(w), front(w2))
    with pytest.raises(ValueError, match="15600"):
        front(w[:, :15000])


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, shape in LAYOUT.items():
        if k.endswith("weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.rand(shape, generator=g) * 0.05
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(sd, path)
    return sd, path


def test_network_equals_functional_reference(weights_file):
    sd, path = weights_file
    enc = get_encoder("vggish").load(weights=str(path))
    assert set(enc.model.state_dict()) == set(LAYOUT)
    assert enc.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    waves = torch.from_numpy(_waves(2, seed=1))
    # independent input: the numpy front end
    x = torch.from_numpy(np.stack([np_logmel(w.astype(np.float64))[:96] for w in waves.numpy()])[:, None]).float()
    with torch.no_grad():
        ours = enc.model(enc.preprocess(waves))
        ref = ref_vggish(sd, x)
    assert ours.shape == (2, 128) == (2, *get_encoder("vggish").feature_shape)
    assert (ours >= 0).all()  # torchvggish's final ReLU
    assert float(ref.abs().max()) > 0
    assert float((ours - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_pca_postprocessing_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    eig = rng.standard_normal((128, 128)) * 0.3
    means = rng.standard_normal(128) * 0.1
    # torchvggish's file holds numpy arrays under these names
    torch.save({"pca_eigen_vectors": eig, "pca_means": means}, tmp_path / "pca.pth")
    raw = get_encoder("vggish").load(weights="random:1")
    enc = get_encoder("vggish").load(weights="random:1", pca=True, pca_params=str(tmp_path / "pca.pth"))
    assert "pca" in enc.weights_info and enc.options["pca"] is True
    assert set(enc.model.state_dict()) == set(LAYOUT)  # PCA buffers stay out of the layout
    waves = torch.from_numpy(_waves(2))
    with torch.no_grad():
        emb = raw.model(raw.preprocess(waves)).double().numpy()
        q = enc.model(enc.preprocess(waves)).numpy()
    ref = np.round((np.clip((eig @ (emb - means).T).T, -2, 2) + 2) * (255.0 / 4))
    assert q.shape == (2, 128) and q.min() >= 0 and q.max() <= 255
    assert np.abs(q - ref).max() <= 1  # float32 vs float64 may flip a rounding


def test_pca_file_with_wrong_shapes(tmp_path):
    torch.save({"pca_eigen_vectors": np.zeros((64, 128)), "pca_means": np.zeros(128)}, tmp_path / "p.pth")
    with pytest.raises(WeightsError, match=r"shape: pca_eigen_vectors file \[64, 128\] expected \[128, 128\]"):
        get_encoder("vggish").load(weights="random", pca=True, pca_params=str(tmp_path / "p.pth"))


def test_wrong_keys_rejected(tmp_path):
    sd = {k.replace("embeddings", "fc"): torch.zeros(v) for k, v in LAYOUT.items() if "features" not in k}
    torch.save(sd, tmp_path / "tf-names.pth")
    with pytest.raises(WeightsError) as err:
        get_encoder("vggish").load(weights=str(tmp_path / "tf-names.pth"))
    msg = str(err.value)
    assert "  missing: embeddings.0.weight" in msg and "  unexpected: fc.0.weight" in msg
    assert "18 missing, 6 unexpected" in msg


def test_channels_last_option_does_not_change_output():
    waves = torch.from_numpy(_waves(2))
    a = get_encoder("vggish").load(weights="random:2")
    b = get_encoder("vggish").load(weights="random:2", channels_last=False)
    with torch.no_grad():
        ya, yb = a.model(a.preprocess(waves)), b.model(b.preprocess(waves))
    assert b.model.features[0].weight.is_contiguous() and not a.model.features[3].weight.is_contiguous()
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5 * float(ya.abs().max()))


def test_preprocess_is_picklable_for_dataloader_workers():
    import pickle
    enc = get_encoder("vggish").load(weights="random")
    front = pickle.loads(pickle.dumps(enc.preprocess))
    w = _waves(1)
    assert torch.equal(front(w), enc.preprocess(torch.from_numpy(w)))  # numpy input accepted


# --------------------------------------------------------------------------- framing
def test_framing_clip_cuts_the_continuous_patches():
    """clip (default): step k = samples [15360k, 15360k + 15600) of the clip (patch k of
    wavfile_to_examples on the whole clip); windows: 15600 samples from the window start;
    past the waveform: zeros. second: no hook (the stage's 1-s chunks)."""
    spec = get_encoder("vggish")
    clip = spec.check_options({})
    assert clip.framing == "clip" and spec.load("random").options["framing"] == "clip"
    wave = np.arange(10 * 16000, dtype=np.float32)
    rows = clip.cut_audio(wave, 16000, np.arange(10.0), 1.0, windowed=False)
    assert rows.shape == (10, 15600) and rows.dtype == np.float32
    for k in range(10):
        np.testing.assert_array_equal(rows[k], wave[15360 * k:15360 * k + 15600])
    win = clip.cut_audio(wave[:32000], 16000, np.array([0.32, 1.6]), 0.96, windowed=True)
    np.testing.assert_array_equal(win[0], wave[5120:5120 + 15600])
    np.testing.assert_array_equal(win[1, :6400], wave[25600:32000])  # runs past the 2-s waveform
    assert (win[1, 6400:] == 0).all()
    assert spec.check_options({"framing": "second"}).cut_audio(wave, 16000, np.arange(10.0), 1.0, False) is None
    with pytest.raises(ValueError, match="32000 Hz"):
        clip.cut_audio(wave, 32000, np.arange(2.0), 1.0, False)
    with pytest.raises(Exception, match=r"encoders\.vggish\.framing: 'whole' is not one of 'clip', 'second'"):
        spec.check_options({"framing": "whole"})


def test_clip_patches_are_the_whole_clip_log_mel_patches():
    """Cutting the patch first equals framing the whole clip's log-mel (frames do not
    depend on their neighbours): patch k = log-mel frames [96k, 96k + 96) of the clip."""
    rng = np.random.default_rng(4)
    wave = (0.3 * rng.standard_normal(3 * 16000)).astype(np.float32)
    whole = np_logmel(wave.astype(np.float64))  # 298 frames
    rows = get_encoder("vggish").check_options({}).cut_audio(wave, 16000, np.arange(3.0), 1.0, False)
    ours = LogMelPatch()(torch.from_numpy(rows))
    for k in range(3):
        assert np.abs(ours[k, 0].numpy() - whole[96 * k:96 * k + 96]).max() < 1e-3
