"""Load and validate run configurations (the same JSON schema Snakemake's `validate` uses)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"
VISUAL_ENCODERS = ("vgg19", "resnet50")
AUDIO_ENCODERS = ("vggish", "cnn14")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(cls):
    # jsonschema does not fill defaults by itself; extend the validator as its docs recommend.
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(Draft202012Validator)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(config: dict, source: str = "config") -> dict:
    """Validate ``config`` in place (filling defaults); raise ConfigError naming key and value."""
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid configuration:"]
        for err in errors:
            lines.append(f"  {_key(err.absolute_path)} = {err.instance!r}: {err.message}")
        raise ConfigError("\n".join(lines))
    _check_semantics(config, source)
    return config


def _check_semantics(cfg: dict, source: str) -> None:
    """Cross-field rules a JSON schema cannot say well."""
    encs = cfg.get("encoders", {})
    for pair in cfg.get("features", []):
        for enc in pair.split("+"):
            base = enc.removesuffix("_ft")
            if base not in encs:
                raise ConfigError(f"{source}: features = {pair!r}: encoder {base!r} is not configured under encoders")
            if enc.endswith("_ft") and not (cfg["finetune"].get("enabled") and base in trained_encoders(cfg)):
                raise ConfigError(f"{source}: features = {pair!r}: {enc!r} needs {_ft_needs(cfg, base)}")
    for head, hc in cfg.get("heads", {}).items():
        for pair in hc.get("features", []):
            if pair not in cfg.get("features", []):
                raise ConfigError(f"{source}: heads.{head}.features = {pair!r}: not listed in `features`")
    ft = cfg.get("finetune", {})
    if ft.get("enabled"):
        for key in ("encoder", "audio"):
            if key not in ft:
                raise ConfigError(f"{source}: finetune.{key} is required when finetune.enabled is true")
            if ft[key] not in encs:
                raise ConfigError(f"{source}: finetune.{key} = {ft[key]!r} is not configured under encoders")
    if cfg["data"]["format"] == "unav100" and cfg.get("windows") is None and cfg["decode"].get("n_segments") is not None:
        raise ConfigError(f"{source}: decode.n_segments = {cfg['decode']['n_segments']!r}: UnAV-100 videos vary in length; set it to null")


def _ft_needs(cfg: dict, base: str) -> str:
    """What the config lacks for `<base>_ft` (fine-tuned `base` features) to exist."""
    ft = cfg.get("finetune", {})
    key, sides = ("audio", "audio or both") if base in AUDIO_ENCODERS else ("encoder", "visual or both")
    have = (f"; finetune.side = {ft.get('side', 'visual')!r} trains {' and '.join(trained_encoders(cfg)) or 'nothing'}"
            if ft.get("enabled") else "")
    return f"finetune.enabled, finetune.{key} = {base!r} and finetune.side = {sides}{have}"


def trained_encoders(cfg: dict) -> list[str]:
    """The encoders `finetune.side` trains (visual: finetune.encoder, audio: finetune.audio,
    both: both), i.e. those that may have `<enc>_ft` features."""
    ft = cfg.get("finetune", {})
    side = ft.get("side", "visual")
    out = []
    if side in ("visual", "both") and "encoder" in ft:
        out.append(ft["encoder"])
    if side in ("audio", "both") and "audio" in ft:
        out.append(ft["audio"])
    return out


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return validate(cfg, str(path))


def feature_encoders(cfg: dict) -> list[str]:
    """Every feature store the run needs (base encoders and fine-tuned ones)."""
    names = list(cfg.get("encoders", {}))
    names += [f"{e}_ft" for e in trained_encoders(cfg)] if cfg["finetune"].get("enabled") else []
    return names


def audio_rates(cfg: dict) -> list[int]:
    rates = {"vggish": 16000, "cnn14": 32000}
    return sorted({rates[e] for e in cfg.get("encoders", {}) if e in rates})


def encoder_settings(cfg: dict, name: str) -> dict[str, Any]:
    """Encoder options with the stage defaults filled (plain values, for Snakemake params)."""
    base = name.removesuffix("_ft")
    opts = {"weights": "random", "frames_per_segment": 16, "batch_size": 16, "num_workers": 1,
            "threads": 2, "dtype": "float16" if base in VISUAL_ENCODERS else "float32"}
    opts.update(cfg.get("encoders", {}).get(base, {}))
    return opts
