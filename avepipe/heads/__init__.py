"""Registry of localization heads (docs/contracts.md "Heads").

``HEADS`` maps a head name to its class and its trainer: ``"ave"`` (AVE segment heads,
avepipe.training.ave) or ``"dense"`` (UnAV-100 dense detection, avepipe.training.dense).
The settings a head supports are its class's ``settings``; its hyper-parameters are its
constructor's keyword arguments (``hparams``). Modules are imported only when asked for, so
importing this package stays cheap and one broken head does not break the others.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass

TRAINERS = {"ave": "ave", "dense": "unav100"}  # trainer -> the dataset format it trains on


@dataclass(frozen=True)
class Head:
    target: str    # "module:Class"
    trainer: str   # a key of TRAINERS

    @property
    def format(self) -> str:
        return TRAINERS[self.trainer]


HEADS: dict[str, Head] = {
    "cace_net": Head("avepipe.heads.cace_net:CACENet", "ave"),
    "ccln": Head("avepipe.heads.ccln:CCLN", "ave"),
    "event_memory": Head("avepipe.heads.event_memory:EventMemory", "ave"),
    "avel": Head("avepipe.heads.baselines:AVEL", "ave"),
    "audio_only": Head("avepipe.heads.baselines:AudioOnly", "ave"),
    "visual_only": Head("avepipe.heads.baselines:VisualOnly", "ave"),
    "dense": Head("avepipe.heads.dense:DenseLocalizer", "dense"),
}

# Keys every TRAIN_DEFAULTS entry ends up with (missing ones take these values).
_DEFAULT_KEYS = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=100, batch_size=64,
                     schedule={"kind": "none"}, clip_grad_norm=None, warmup_epochs=0)
# constructor arguments that are not hyper-parameters (the trainer passes them)
_NOT_HPARAMS = {"self", "visual_shape", "visual_dim", "audio_dim", "setting", "num_classes"}


def entry(name: str) -> Head:
    if name not in HEADS:
        raise KeyError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[name]


def _split(name: str) -> tuple[str, str]:
    module, _, cls = entry(name).target.partition(":")
    return module, cls


def head_module(name: str):
    """The imported module of head ``name``."""
    return importlib.import_module(_split(name)[0])


def head_class(name: str):
    """The head class registered as ``name`` (imports its module)."""
    return getattr(head_module(name), _split(name)[1])


def module_file(name: str) -> str:
    """Package-relative source file of head ``name`` (e.g. "heads/baselines.py"), without importing it."""
    return _split(name)[0].removeprefix("avepipe.").replace(".", "/") + ".py"


def settings(name: str) -> tuple[str, ...]:
    """The settings head ``name`` implements (full / weak / cml)."""
    return tuple(getattr(head_class(name), "settings", ("full",)))


def hparams(name: str) -> dict[str, object]:
    """The head's hyper-parameters and their defaults: its constructor's keyword arguments."""
    sig = inspect.signature(head_class(name).__init__)
    return {p.name: p.default for p in sig.parameters.values()
            if p.name not in _NOT_HPARAMS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is not inspect.Parameter.empty}


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


def check_hparams(name: str, given: dict) -> None:
    """Raise ValueError naming unknown hyper-parameters of head ``name``."""
    known = hparams(name)
    bad = sorted(set(given) - set(known))
    if bad:
        raise ValueError(f"head {name!r} has no hyper-parameter(s) {bad}; known: {', '.join(sorted(known))}")


def build(name: str, visual_shape: tuple, audio_dim: int, setting: str = "full",
          num_classes: int = 28, **hparams):
    """Instantiate AVE head ``name`` for features of per-segment ``visual_shape`` and ``audio_dim``."""
    if entry(name).trainer != "ave":
        raise ValueError(f"head {name!r} is a {entry(name).trainer} head; build it with its trainer")
    have = settings(name)
    if setting not in have:
        raise ValueError(f"head {name!r} defines settings {have}, not {setting!r}")
    check_hparams(name, hparams)
    return head_class(name)(tuple(int(s) for s in visual_shape), int(audio_dim), setting=setting,
                            num_classes=num_classes, **hparams)


def train_defaults(name: str, setting: str) -> dict:
    """A copy of the head module's ``TRAIN_DEFAULTS[setting]``, completed with neutral keys."""
    defaults = getattr(head_module(name), "TRAIN_DEFAULTS", None)
    have = settings(name)
    if setting not in have:
        raise KeyError(f"head {name!r} defines settings {have}, not {setting!r}")
    if not defaults or setting not in defaults:
        raise KeyError(f"head {name!r} has no TRAIN_DEFAULTS for setting {setting!r} "
                       f"(has {sorted(defaults) if defaults else []})")
    out = copy.deepcopy(_DEFAULT_KEYS)
    out.update(copy.deepcopy(defaults[setting]))
    return out
