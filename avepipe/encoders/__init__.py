"""Feature encoders: registry, spec and loaded-encoder types (docs/contracts.md "Encoders").

Adding an encoder is one file: a module in this package that defines ``SPEC``
(an :class:`EncoderSpec`). The registry below discovers such modules, so nothing
else needs editing. Heavy dependencies (panns) are imported only at ``load`` time.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class LoadedEncoder:
    """A ready model plus its preprocessing and provenance."""

    model: torch.nn.Module  # eval(); visual: (N,3,224,224) -> (N,7,7,C) (or (N,C) pooled); audio: -> (N,D)
    preprocess: Callable  # visual: uint8 (N,H,W,3) -> float (N,3,224,224); audio: (N, sample_rate) -> model input
    weights_info: dict  # {"id": ..., "sha256": ..., "source": ...}
    options: dict  # preprocessing name etc., for provenance


@dataclass
class EncoderSpec:
    """Static description of an encoder; ``load`` builds it with weights."""

    name: str  # vgg19 | resnet50 | vggish | cnn14
    modality: str  # "visual" | "audio"
    feature_shape: tuple  # per step: (7,7,512), (7,7,2048), (128,), (2048,)
    sample_rate: int | None  # audio encoders: 16000 / 32000
    default_weights: str  # "imagenet" | "audioset"
    # name -> avepipe.encoders.weights.OfficialWeights ("imagenet", "audioset", aliases)
    official: dict = field(default_factory=dict, repr=False)
    # the module's builder: loader(spec, weights, device, **opts) -> LoadedEncoder
    loader: Callable[..., LoadedEncoder] | None = field(default=None, repr=False)

    def load(self, weights: str = "random", device: Any = "cpu", **opts) -> LoadedEncoder:
        """Build the model with ``weights`` ("random[:seed]", an official name such as
        "imagenet"/"audioset", or a path to a state dict in the official layout).

        Weight problems raise :class:`avepipe.encoders.weights.WeightsError` here,
        before any extraction work starts.
        """
        if self.loader is None:
            raise NotImplementedError(f"encoder {self.name!r} has no loader")
        return self.loader(self, weights, device, **opts)


def _discover() -> dict[str, EncoderSpec]:
    found: dict[str, EncoderSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "weights":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, EncoderSpec):
            if spec.name in found:
                raise RuntimeError(f"two encoder modules define the name {spec.name!r}")
            found[spec.name] = spec
    return found


ENCODERS: dict[str, EncoderSpec] = _discover()


def get_encoder(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered under ``name`` (e.g. "vgg19")."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}") from None


__all__ = ["ENCODERS", "EncoderSpec", "LoadedEncoder", "get_encoder"]
