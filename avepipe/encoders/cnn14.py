"""PANNs Cnn14 embeddings (Kong et al. 2020), as CACE-Net feeds them (docs/reference.md §2.4).

The model is ``panns_inference.models.Cnn14`` itself (32 kHz, window 1024, hop 320, 64
Slaney mels 50-14000 Hz, 527 classes); the feature is its 2048-d ``embedding``
(relu(fc1(max_t + mean_t))) of each 1-s chunk (32000 samples).

``import panns_inference`` runs its ``config.py``, which shells out to ``wget`` for the
AudioSet label csv and, offline, leaves an empty file behind. We load only the package's
``models`` module (and its ``pytorch_utils``) under a private package name, so the
package ``__init__``/``config`` never run: no subprocess, no network, no file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import torch
from torch import nn

from avepipe.encoders import EncoderSpec, LoadedEncoder
from avepipe.encoders.weights import (OfficialWeights, WeightsError, build_with_weights, inference_ready,
                                      state_over_base)

SAMPLE_RATE = 32000
MIN_SAMPLES = 9920  # shortest input the 6 pooling stages accept
CNN14_ARGS = dict(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000,
                  classes_num=527)
_PRIVATE_PKG = "_avepipe_panns_inference"


def panns_models() -> types.ModuleType:
    """``panns_inference.models`` without executing ``panns_inference/__init__.py``."""
    if "panns_inference.models" in sys.modules:  # someone imported the package already
        return sys.modules["panns_inference.models"]
    name = f"{_PRIVATE_PKG}.models"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.find_spec("panns_inference")  # locates; does not execute __init__
    if found is None or not found.submodule_search_locations:
        raise ImportError("panns_inference is not installed (pip install panns-inference)")
    # An empty stand-in package whose __path__ is the real one: `from .pytorch_utils import`
    # inside models.py resolves against it, and the real __init__ (config.py) never runs.
    pkg = types.ModuleType(_PRIVATE_PKG)
    pkg.__path__ = list(found.submodule_search_locations)
    pkg.__package__ = _PRIVATE_PKG
    sys.modules[_PRIVATE_PKG] = pkg
    return importlib.import_module(name)


class _Float32Front(nn.Module):
    """Mixin: run the STFT / log-mel front end in float32 even under bf16 autocast."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


_CLASS_CACHE: dict[str, type] = {}


def cnn14_embedding_class() -> type:
    """A subclass of panns' Cnn14 whose forward returns the (N,2048) embedding.

    Subclassing (not wrapping) keeps the state dict keys of the official checkpoint.
    """
    if "cls" not in _CLASS_CACHE:
        Cnn14 = panns_models().Cnn14

        class Cnn14Embedding(Cnn14):
            def __init__(self):
                super().__init__(**CNN14_ARGS)
                # same modules and keys, float32 forward (class swap, no new parameters)
                for attr in ("spectrogram_extractor", "logmel_extractor"):
                    mod = getattr(self, attr)
                    mod.__class__ = type(f"Float32{type(mod).__name__}", (_Float32Front, type(mod)), {})

            def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (N, samples) -> (N, 2048)
                return super().forward(wave)["embedding"]

        _CLASS_CACHE["cls"] = Cnn14Embedding
    return _CLASS_CACHE["cls"]


def _unwrap(obj: Any, where: str) -> Any:
    """Official checkpoints are ``{"model": state_dict, ...}``; a bare state dict is accepted too."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and any(str(k).startswith("conv_block1.") for k in obj):
        return obj
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise WeightsError(f"{where}: expected a PANNs checkpoint dict with key 'model' "
                       f"(as Cnn14_mAP=0.431.pth); found {keys}")


def preprocess(wave: Any) -> torch.Tensor:
    """float waveform (N, 32000) at 32 kHz -> float32 tensor (N, 32000); Cnn14 does its own log-mel."""
    x = torch.as_tensor(wave)
    if x.ndim != 2 or x.shape[-1] < MIN_SAMPLES:
        raise ValueError(f"cnn14: expected waveform (N, >= {MIN_SAMPLES}) at {SAMPLE_RATE} Hz, got {tuple(x.shape)}")
    return x.float()


def load(spec: EncoderSpec, weights: str, device: Any, *, seed: int | None, channels_last: bool) -> LoadedEncoder:
    """Build Cnn14 -> 2048-d embedding per chunk (no options of its own)."""
    model, info = build_with_weights(spec, weights, lambda: cnn14_embedding_class()(), unwrap=_unwrap,
                                     seed=seed)
    model = inference_ready(model, device, channels_last)
    options = {"preprocessing": "panns_cnn14_logmel", "output": "embedding", **CNN14_ARGS,
               "channels_last": channels_last}
    return LoadedEncoder(model=model, preprocess=preprocess, weights_info=info, options=options)


def blocks(model: nn.Module) -> list[nn.Module]:
    """conv_block1..6 and fc1 (the embedding layer); the log-mel front end, bn0 and the
    AudioSet classifier are no block."""
    return [getattr(model, f"conv_block{i}") for i in range(1, 7)] + [model.fc1]


def _checkpoint_state(obj: Any) -> Any:
    return obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj


def saved_layout(spec: EncoderSpec, model: nn.Module, base_weights: str, seed: int) -> dict:
    """A PANNs checkpoint ``{"model": state_dict}`` holding every key of the base checkpoint's
    model (classifier and front-end buffers included)."""
    return {"model": state_over_base(spec, model, base_weights, unwrap=_checkpoint_state)}


# Zenodo publishes each file's md5 and size on the record page: both checked on every load
_AUDIOSET = OfficialWeights("panns:Cnn14_mAP=0.431", "Cnn14_mAP=0.431.pth",
                            "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1",
                            md5="541141fa2ee191a88f24a3219fff024e", size=327428481,
                            pinned_by="https://zenodo.org/records/3987831")

SPEC = EncoderSpec(
    name="cnn14",
    modality="audio",
    feature_shape=(2048,),
    sample_rate=SAMPLE_RATE,
    default_weights="audioset",
    official={"audioset": _AUDIOSET},
    loader=load,
    default_dtype="float32",
    blocks=blocks,
    frozen=("spectrogram_extractor", "logmel_extractor", "bn0", "spec_augmenter", "fc_audioset"),
    saved_layout=saved_layout,
)
