"""VGGish against torchvggish itself (the PyPI package), end to end on the same 16-kHz
waveform with the same (random) weights: its `vggish_input.waveform_to_examples` log-mel
patches and its network, in both framings, through avepipe's extraction stage. Skips
without torchvggish (a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from avepipe.encoders import get_encoder
from avepipe.extract import audio_inputs, extract_shard
from avepipe.store import open_features

tv = pytest.importorskip("torchvggish")
from torchvggish import vggish_input, vggish_params  # noqa: E402
from torchvggish import torchvggish as tv_model  # noqa: E402

torch.set_num_threads(1)
RATE = 16000
SECONDS = 10  # an AVE clip


def _waveform(seed: int = 0) -> np.ndarray:
    """10 s whose content changes within each second (tones that step every 0.25 s, a
    chirp, noise bursts), so that shifting a patch by 0.04k s changes it."""
    rng = np.random.default_rng(seed)
    t = np.arange(SECONDS * RATE) / RATE
    tone = np.sin(2 * np.pi * (300 + 200 * np.floor(t * 4) % 1700) * t)
    chirp = np.sin(2 * np.pi * (100 * t + 150 * t ** 2))
    bursts = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 1.3 * t) > 0.6)
    return (0.4 * tone + 0.3 * chirp + 0.1 * bursts).astype(np.float32)


def _torchvggish_network() -> torch.nn.Module:
    """torchvggish's own VGG, built without its pretrained download."""
    try:
        return tv_model.VGG(tv_model.make_layers(), postprocess=False)  # PyPI 0.2
    except TypeError:
        return tv_model.VGG(tv_model.make_layers())  # the GitHub layout


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One random state dict (He-scaled, non-zero biases: embeddings that vary) loaded into
    torchvggish and saved for avepipe."""
    net = _torchvggish_network()
    g = torch.Generator().manual_seed(11)
    sd = {}
    for k, v in net.state_dict().items():
        fan_in = int(np.prod(v.shape[1:])) if v.ndim > 1 else 1
        sd[k] = (torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5 if v.ndim > 1
                 else torch.rand(v.shape, generator=g) * 0.1)
    net.load_state_dict(sd)
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(sd, path)
    return net.eval(), path


def _shard(path, wave: np.ndarray) -> pd.DataFrame:
    """A decoded shard holding ``wave`` as the 16-kHz audio of one video (docs/contracts.md)."""
    g = zarr.open_group(str(path), mode="w")
    for name, vals in (("video_id", ["v"]), ("status", ["ok"]), ("reason", [""]), ("warnings", [""])):
        g.create_array(name, shape=(1,), dtype=str)[:] = np.array(vals, dtype=object)
    g.create_array("n_segments", data=np.array([SECONDS], np.int32))
    g.create_array("audio_16000", data=wave[None])
    g.attrs["provenance"] = {"code_fingerprint": "x"}
    return pd.DataFrame({"video_id": ["v"], "path": [""]})


def _reference_examples(wave: np.ndarray, framing: str) -> torch.Tensor:
    """torchvggish's log-mel patches: the whole clip (clip), or each 1-s chunk (second)."""
    if framing == "clip":
        return vggish_input.waveform_to_examples(wave.astype(np.float64), RATE)
    chunks = [vggish_input.waveform_to_examples(wave[k * RATE:(k + 1) * RATE].astype(np.float64), RATE)
              for k in range(SECONDS)]
    assert all(len(c) == 1 for c in chunks)  # 1 s = 98 frames: one patch, its first 96 frames
    return torch.cat(chunks)


@pytest.mark.parametrize("framing", ["clip", "second"])
def test_log_mel_patches_equal_waveform_to_examples(framing):
    wave = _waveform()
    ref = _reference_examples(wave, framing).detach()
    assert ref.shape == (SECONDS, 1, 96, 64)
    opts = get_encoder("vggish").check_options({"framing": framing})
    rows = audio_inputs(opts, wave, RATE, np.arange(SECONDS, dtype=np.float64), 1.0, windowed=False)
    ours = get_encoder("vggish").load("random").preprocess(torch.from_numpy(rows))
    diff, mean = float((ours - ref).abs().max()), float((ours - ref).abs().mean())
    print(f"log-mel ({framing}): max |avepipe - torchvggish| = {diff:.3g} (mean {mean:.3g})")
    # avepipe's float32 rfft vs torchvggish's float64 numpy: log(mel + 0.01) of the quietest
    # bins (energy near the 0.01 offset) is where float32 shows
    assert diff < 1e-3 and mean < 5e-5
    # the two framings differ from segment 1 on (segment k shifted by 0.04k s)
    other = _reference_examples(wave, "second" if framing == "clip" else "clip").detach()
    assert torch.equal(other[0], ref[0]) or float((other[0] - ref[0]).abs().max()) < 1e-9
    assert float((other[1:] - ref[1:]).abs().amax(dim=(1, 2, 3)).min()) > 0.1


@pytest.mark.parametrize("framing", ["clip", "second"])
def test_extraction_equals_torchvggish_end_to_end(weights, framing, tmp_path):
    net, path = weights
    wave = _waveform(seed=1)
    index = _shard(tmp_path / "dec.zarr", wave)
    out = extract_shard(tmp_path / "dec.zarr", index, "vggish", str(path), tmp_path / "f.zarr",
                        num_workers=0, dtype="float32", progress=False, framing=framing)
    got = open_features(out).features[0].compute()
    with torch.no_grad():
        ref = net(_reference_examples(wave, framing).detach()).numpy()
    scale, diff = float(np.abs(ref).max()), float(np.abs(got - ref).max())
    print(f"embeddings ({framing}): max |avepipe - torchvggish| = {diff:.3g}, max |ref| = {scale:.3g}")
    assert got.shape == ref.shape == (SECONDS, 128)
    assert scale > 0.1 and float(ref.std(axis=0).max()) > 1e-3 * scale  # embeddings vary by segment
    assert diff <= 5e-5 * scale


def test_unav_windows_clip_equals_waveform_to_examples_with_that_hop(weights, tmp_path, monkeypatch):
    """`framing: clip` with 0.96-s windows every 0.32 s is vggish_input with an example hop of
    0.32 s (UnAV-100's 24-frame windows, stride 8, at 25 fps) on the whole waveform."""
    net, path = weights
    wave = _waveform(seed=2)
    index = _shard(tmp_path / "dec.zarr", wave)
    out = extract_shard(tmp_path / "dec.zarr", index, "vggish", str(path), tmp_path / "f.zarr", window=0.96,
                        hop=0.32, num_workers=0, dtype="float32", progress=False, framing="clip")
    fs = open_features(out)
    monkeypatch.setattr(vggish_params, "EXAMPLE_HOP_SECONDS", 0.32)
    examples = vggish_input.waveform_to_examples(wave.astype(np.float64), RATE).detach()
    assert int(fs.lengths[0]) == len(examples) == 29  # 1 + (998 - 96) // 32
    with torch.no_grad():
        ref = net(examples).numpy()
    got = fs.features[0, :29].compute()
    scale, diff = float(np.abs(ref).max()), float(np.abs(got - ref).max())
    print(f"UnAV windows (clip): max |avepipe - torchvggish| = {diff:.3g}, max |ref| = {scale:.3g}")
    assert diff <= 5e-5 * scale
