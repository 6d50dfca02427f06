"""Feature encoders: registry, spec and loaded-encoder types (docs/contracts.md "Encoders").

Adding an encoder is one file: a module in this package that defines ``SPEC`` (an
:class:`EncoderSpec`). Everything the rest of avepipe needs to know about an encoder lives on
its spec: modality, feature shape, sample rate, stored dtype, official weights, its own
options (a dataclass of :func:`avepipe.options.option` fields), its blocks for fine-tuning
and the layout its fine-tuned weights are saved in. The registry below discovers such
modules, so nothing else needs editing. Heavy dependencies (panns) are imported only at
``load`` time.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class EncoderOptionError(ValueError):
    """An encoder option is unknown or has a value the encoder does not accept."""


@dataclass
class LoadedEncoder:
    """A ready model plus its preprocessing and provenance."""

    model: torch.nn.Module  # eval(); visual: (N,3,224,224) -> (N,7,7,C) (or (N,C) pooled); audio: -> (N,D)
    preprocess: Callable  # visual: uint8 (N,H,W,3) -> float (N,3,224,224); audio: (N, sample_rate) -> model input
    weights_info: dict  # {"id": ..., "sha256": ..., "source": ...}
    options: dict  # preprocessing name etc., for provenance


@dataclass
class NoOptions:
    """An encoder without options of its own."""


@dataclass
class EncoderSpec:
    """Static description of an encoder; ``load`` builds it with weights."""

    name: str  # vgg19 | resnet50 | vggish | cnn14
    modality: str  # "visual" | "audio"
    feature_shape: tuple  # per step: (7,7,512), (7,7,2048), (128,), (2048,)
    sample_rate: int | None  # audio encoders: 16000 / 32000
    default_weights: str  # the official name a missing `weights:` means: "imagenet" | "audioset"
    # name -> avepipe.encoders.weights.OfficialWeights ("imagenet", "audioset", aliases)
    official: dict = field(default_factory=dict, repr=False)
    # the module's builder: loader(spec, weights, device, *, seed, channels_last, **opts) -> LoadedEncoder
    loader: Callable[..., LoadedEncoder] | None = field(default=None, repr=False)
    # the encoder's own options: a dataclass whose fields are avepipe.options.option(...)
    options: type = NoOptions
    default_dtype: str = "float32"  # stored feature dtype unless the config says otherwise
    # model -> its blocks in forward order (the unit of `finetune.trainable: last:<n>`)
    blocks: Callable[[torch.nn.Module], list] | None = field(default=None, repr=False)
    # top-level modules that are never a block (front ends, classifier): always frozen
    frozen: tuple = ()
    # (spec, model, base_weights, seed) -> what torch.save writes for a fine-tuned model
    saved_layout: Callable[..., Any] | None = field(default=None, repr=False)
    # encoder options (a config section) -> official files besides the weights (VGGish's PCA)
    extra_files: Callable[[dict], list] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ weights
    def extra_official_files(self, options: dict) -> list:
        """OfficialWeights of the files these options load besides the weights (preflight)."""
        return list(self.extra_files(options)) if self.extra_files is not None else []

    @property
    def official_names(self) -> tuple[str, ...]:
        """Names accepted as `weights:` besides random[:seed] and a path (case-insensitive)."""
        return tuple(self.official)

    def load(self, weights: str | None = None, device: Any = "cpu", *, seed: int | None = None,
             channels_last: bool = True, **opts) -> LoadedEncoder:
        """Build the model with ``weights``: None (the official ``default_weights``), an
        official name, "random[:seed]", or a path to a state dict in the official layout.
        ``opts`` are the encoder's own options (``self.options``), checked first.

        Weight problems raise :class:`avepipe.encoders.weights.WeightsError` here,
        before any extraction work starts.
        """
        if self.loader is None:
            raise NotImplementedError(f"encoder {self.name!r} has no loader")
        checked = self.check_options(opts)
        weights = self.default_weights if weights is None else weights
        return self.loader(self, weights, device, seed=seed, channels_last=channels_last,
                           **dataclasses.asdict(checked))

    # ------------------------------------------------------------------ options
    def check_options(self, opts: dict | None) -> Any:
        """An instance of ``self.options`` from ``opts`` (missing keys take their defaults);
        an unknown key or a bad value raises :class:`EncoderOptionError` naming
        ``encoders.<name>.<key>`` and what is allowed."""
        opts = dict(opts or {})
        known = {f.name: f for f in dataclasses.fields(self.options)}
        hints = typing.get_type_hints(self.options)
        for key, value in opts.items():
            where = f"encoders.{self.name}.{key}"
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise EncoderOptionError(f"{where}: unknown option (options of {self.name}: {allowed})")
            _check_value(where, value, hints[key], known[key].metadata)
        return self.options(**opts)

    def output_shape(self, opts: dict | None = None) -> tuple:
        """Per-step feature shape under these options (``pooled``: the channel vector)."""
        pooled = getattr(self.check_options(opts), "pooled", False)
        return tuple(self.feature_shape[-1:] if pooled else self.feature_shape)

    # ------------------------------------------------------------------ fine-tuning
    def trainable_blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The model's blocks in forward order, the unit of `finetune.trainable: last:<n>`.
        Modules in ``frozen`` (front ends, classifier) are in no block."""
        if self.blocks is None:
            raise NotImplementedError(f"encoder {self.name!r} cannot be fine-tuned (no blocks)")
        return self.blocks(model)

    def official_state_dict(self, model: torch.nn.Module, base_weights: str | None, seed: int) -> Any:
        """What ``torch.save`` writes for a fine-tuned ``model``: its weights over every key of
        ``base_weights`` (None: ``default_weights``), in the encoder's official layout, so
        ``load(path)`` reads it back as a local weights file. ``seed`` seeds the parts a
        random base lacks (e.g. torchvision's classifier, unused by extraction)."""
        if self.saved_layout is None:
            raise NotImplementedError(f"encoder {self.name!r} has no saved-weights layout")
        base = self.default_weights if base_weights is None else base_weights
        return self.saved_layout(self, model, base, seed)


_KINDS = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}


def _check_value(where: str, value: Any, hint: Any, meta: typing.Mapping) -> None:
    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    choices = meta.get("choices")
    if value is None:
        if nullable:
            return
        raise EncoderOptionError(f"{where}: null is not allowed ("
                                 + (f"one of {', '.join(map(repr, choices))})" if choices else
                                    f"{_KINDS.get(base, base)})"))
    # bool is a subclass of int: check it on its own, both ways
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, base))
    if not ok:
        kind = _KINDS.get(base, getattr(base, "__name__", str(base))) + (" or null" if nullable else "")
        raise EncoderOptionError(f"{where}: {value!r} is not {kind}"
                                 + (f" (one of {', '.join(map(repr, choices))})" if choices else ""))
    if choices and value not in choices:
        raise EncoderOptionError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise EncoderOptionError(f"{where}: {value!r} is outside [{lo}, {hi}]")


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


def encoder_names(modality: str | None = None) -> list[str]:
    """Registered encoder names (of one modality), sorted."""
    return sorted(n for n, s in ENCODERS.items() if modality is None or s.modality == modality)


__all__ = ["ENCODERS", "EncoderOptionError", "EncoderSpec", "LoadedEncoder", "NoOptions", "encoder_names",
           "get_encoder"]
