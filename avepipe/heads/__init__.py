"""Registry of AVEL heads (contracts.md "Heads").

``HEADS`` maps a head name to ``"module:Class"``; modules are imported only when a head
is built, so importing :mod:`avepipe.heads` stays cheap and one broken head does not
break the others.
"""
from __future__ import annotations

import copy
import importlib

HEADS: dict[str, str] = {
    "cace_net": "avepipe.heads.cace_net:CACENet",
    "ccln": "avepipe.heads.ccln:CCLN",
    "event_memory": "avepipe.heads.event_memory:EventMemory",
    "avel": "avepipe.heads.baselines:AVEL",
    "audio_only": "avepipe.heads.baselines:AudioOnly",
    "visual_only": "avepipe.heads.baselines:VisualOnly",
}

# Keys every TRAIN_DEFAULTS entry ends up with (missing ones take these values).
_DEFAULT_KEYS = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=100, batch_size=64,
                     schedule={"kind": "none"}, clip_grad_norm=None, warmup_epochs=0)


def _split(name: str) -> tuple[str, str]:
    if name not in HEADS:
        raise KeyError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    module, _, cls = HEADS[name].partition(":")
    return module, cls


def head_module(name: str):
    """The imported module of head ``name``."""
    return importlib.import_module(_split(name)[0])


def head_class(name: str):
    """The head class registered as ``name`` (imports its module)."""
    return getattr(head_module(name), _split(name)[1])


def available() -> list[str]:
    """Registered heads whose module imports (others may still be missing / broken)."""
    out = []
    for name in HEADS:
        try:
            head_class(name)
        except (ImportError, AttributeError):
            continue
        out.append(name)
    return out


def build(name: str, visual_shape: tuple, audio_dim: int, setting: str = "full",
          num_classes: int = 28, **hparams):
    """Instantiate head ``name`` for features of per-segment ``visual_shape`` and ``audio_dim``."""
    cls = head_class(name)
    settings = tuple(getattr(cls, "settings", ("full",)))
    if setting not in settings:
        raise ValueError(f"head {name!r} defines settings {settings}, not {setting!r}")
    return cls(tuple(int(s) for s in visual_shape), int(audio_dim), setting=setting,
               num_classes=num_classes, **hparams)


def train_defaults(name: str, setting: str) -> dict:
    """A copy of the head module's ``TRAIN_DEFAULTS[setting]``, completed with neutral keys."""
    defaults = getattr(head_module(name), "TRAIN_DEFAULTS", None)
    settings = tuple(getattr(head_class(name), "settings", ("full",)))
    if setting not in settings:
        raise KeyError(f"head {name!r} defines settings {settings}, not {setting!r}")
    if not defaults or setting not in defaults:
        have = sorted(defaults) if defaults else []
        raise KeyError(f"head {name!r} has no TRAIN_DEFAULTS for setting {setting!r} (has {have})")
    out = copy.deepcopy(_DEFAULT_KEYS)
    out.update(copy.deepcopy(defaults[setting]))
    return out
