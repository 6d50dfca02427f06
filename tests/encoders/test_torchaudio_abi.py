"""torchaudio 2.11.0 ships abi3 extension builds; prove they load and compute correctly with the
installed torch (2.14.1): real ops compared against independent numpy computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

torchaudio = pytest.importorskip("torchaudio")
torch.set_num_threads(1)


def test_versions_and_abi3_extension_loaded():
    assert torchaudio.__version__.startswith("2.11")
    libs = sorted(p.name for p in (Path(torchaudio.__file__).parent / "lib").glob("*.so"))
    assert any(n.endswith(".abi3.so") for n in libs), libs
    from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE
    assert _IS_TORCHAUDIO_EXT_AVAILABLE  # the C++ ops registered against this torch
    assert hasattr(torch.ops.torchaudio, "_lfilter_core_loop")


def test_lfilter_compiled_loop_matches_numpy_recursion():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000)
    # a stable 2nd-order low-pass (RBJ biquad, f0 = 1 kHz at 16 kHz, Q = 0.707)
    w0, q = 2 * math.pi * 1000 / 16000, 0.707
    alpha, c = math.sin(w0) / (2 * q), math.cos(w0)
    b = np.array([(1 - c) / 2, 1 - c, (1 - c) / 2])
    a = np.array([1 + alpha, -2 * c, 1 - alpha])
    b, a = b / a[0], a / a[0]
    y_ref = np.zeros_like(x)
    for n in range(len(x)):  # direct form I difference equation
        y_ref[n] = sum(b[k] * x[n - k] for k in range(3) if n - k >= 0) - sum(
            a[k] * y_ref[n - k] for k in range(1, 3) if n - k >= 0)
    y = torchaudio.functional.lfilter(torch.from_numpy(x), torch.from_numpy(a), torch.from_numpy(b), clamp=False)
    assert np.abs(y.numpy() - y_ref).max() < 1e-9


def _np_htk_fbanks(n_freqs, f_min, f_max, n_mels, sr):
    """Triangular filters in Hz between HTK-mel-spaced points, no normalisation."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    inv = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    freqs = np.linspace(0, sr / 2, n_freqs)
    pts = inv(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    fb = np.zeros((n_freqs, n_mels))
    for i in range(n_mels):
        lo, c, hi = pts[i:i + 3]
        fb[:, i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
    return fb


def test_melscale_fbanks_matches_numpy():
    fb = torchaudio.functional.melscale_fbanks(257, 125.0, 7500.0, 64, 16000, norm=None, mel_scale="htk")
    assert fb.shape == (257, 64)
    assert np.abs(fb.numpy() - _np_htk_fbanks(257, 125.0, 7500.0, 64, 16000)).max() < 1e-5


def test_melspectrogram_forward_matches_numpy_stft():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4000).astype(np.float32)
    t = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                                             f_min=125.0, f_max=7500.0, n_mels=64, power=2.0,
                                             mel_scale="htk", norm=None, center=True, pad_mode="reflect")
    ours = t(torch.from_numpy(x)).numpy()  # (64, frames)
    # numpy: reflect-pad n_fft/2, frames of 512 every 160, periodic Hann(400) centred in 512
    xp = np.pad(x.astype(np.float64), 256, mode="reflect")
    n = 1 + (len(xp) - 512) // 160
    win = np.zeros(512)
    win[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([xp[i * 160:i * 160 + 512] for i in range(n)])
    power = np.abs(np.fft.rfft(frames * win, 512)) ** 2
    ref = (power @ _np_htk_fbanks(257, 125.0, 7500.0, 64, 16000)).T
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_resample_sine_16k_to_32k():
    t16 = np.arange(16000) / 16000
    t32 = np.arange(32000) / 32000
    y = torchaudio.functional.resample(torch.from_numpy(np.sin(2 * np.pi * 440 * t16)).float(), 16000, 32000)
    ref = np.sin(2 * np.pi * 440 * t32)
    assert y.shape == (32000,)
    inner = slice(200, -200)  # filter edge effects
    assert np.abs(y.numpy()[inner] - ref[inner]).max() < 5e-3
