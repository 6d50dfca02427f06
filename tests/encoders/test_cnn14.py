"""Cnn14: offline-safe import; embedding equals a plain panns Cnn14 forward; checkpoint format."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from avepipe.encoders import get_encoder
from avepipe.encoders.cnn14 import CNN14_ARGS, panns_models
from avepipe.encoders.weights import WeightsError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh interpreter importing torch: ~10-25 s on a loaded 2-core box
def test_import_is_offline_safe(tmp_path):
    """Fresh interpreter, empty HOME: importing panns' models spawns nothing, touches no
    network and leaves no (empty) labels csv behind (its package config.py would wget)."""
    code = textwrap.dedent("""
        import sys
        # torch/torchvision first: their CUDA library lookup runs `ldconfig -p` (not ours)
        import torch, torchvision, avepipe.encoders
        events = []
        def hook(event, args):
            if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork",
                         "os.forkpty", "os.spawn", "socket.connect", "socket.getaddrinfo"):
                events.append((event, repr(args)[:200]))
        sys.addaudithook(hook)
        from avepipe.encoders.cnn14 import panns_models
        m = panns_models()
        assert m.Cnn14.__name__ == "Cnn14"
        assert "panns_inference" not in sys.modules, "the package __init__ (config.py) ran"
        print("EVENTS", events)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "PYTHONPATH")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    try:  # reuse the existing matplotlib font cache: building one would itself spawn fc-list
        import matplotlib
        env["MPLCONFIGDIR"] = matplotlib.get_cachedir()
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EVENTS []" in out.stdout, out.stdout
    assert not (tmp_path / "panns_data").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(21)
    plain = panns_models().Cnn14(**CNN14_ARGS)
    for m in plain.modules():  # non-trivial BN statistics (bn0 normalises the log-mel)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0) if m is plain.bn0 else m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    plain.eval()
    path = tmp_path_factory.mktemp("cnn14") / "Cnn14-random.pth"
    torch.save({"model": plain.state_dict(), "iteration": 0}, path)  # the official checkpoint format
    return plain, path


def _waves(n=2, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(32000) / 32000
    w = [0.2 * np.sin(2 * np.pi * 440 * (k + 1) * t) + 0.05 * rng.standard_normal(32000) for k in range(n)]
    return torch.from_numpy(np.stack(w).astype(np.float32))


def test_embedding_equals_plain_panns_forward(reference):
    plain, path = reference
    enc = get_encoder("cnn14").load(weights=str(path))
    assert enc.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(enc.model.state_dict()) == set(plain.state_dict())  # the checkpoint's key layout
    waves = _waves()
    with torch.no_grad():
        ours = enc.model(enc.preprocess(waves))
        ref = plain(waves)["embedding"]
    assert ours.shape == (2, 2048) == (2, *get_encoder("cnn14").feature_shape)
    assert float(ref.abs().max()) > 0
    assert float((ours - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert not enc.model.training


def test_bare_state_dict_accepted_and_bad_format_rejected(reference, tmp_path):
    plain, _ = reference
    torch.save(plain.state_dict(), tmp_path / "bare.pth")
    enc = get_encoder("cnn14").load(weights=str(tmp_path / "bare.pth"))
    assert torch.equal(enc.model.fc1.weight, plain.fc1.weight)
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="key 'model'"):
        get_encoder("cnn14").load(weights=str(tmp_path / "other.pth"))


def test_wrong_class_count_rejected(reference, tmp_path):
    sd = dict(reference[0].state_dict())
    sd["fc_audioset.weight"] = torch.zeros(10, 2048)
    sd["fc_audioset.bias"] = torch.zeros(10)
    torch.save({"model": sd}, tmp_path / "c10.pth")
    with pytest.raises(WeightsError, match=r"shape: fc_audioset.bias file \[10\] expected \[527\]"):
        get_encoder("cnn14").load(weights=str(tmp_path / "c10.pth"))


def test_preprocess_checks_input():
    from avepipe.encoders.cnn14 import preprocess
    assert preprocess(np.zeros((1, 32000), np.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match="9920"):
        preprocess(torch.zeros(1, 5000))
