"""Config validation: every shipped config is valid; errors name the key and the value."""
from pathlib import Path

import pytest
import yaml

from avepipe.config import ConfigError, audio_rates, feature_encoders, load_config, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "workflow" / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg["data"]["format"] in ("ave", "unav100")
    assert cfg["decode"]["shards"] >= 1  # default filled in


def test_demo_has_every_stage():
    cfg = load_config(REPO / "workflow/config/demo.yaml")
    assert set(cfg["heads"]) == {"cace_net", "ccln", "event_memory", "avel", "audio_only", "visual_only"}
    assert cfg["finetune"]["enabled"] and "resnet50_ft" in feature_encoders(cfg)
    assert audio_rates(cfg) == [16000, 32000]
    assert cfg["also"] == ["workflow/config/demo_unav.yaml"]


def _demo():
    return yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())


@pytest.mark.parametrize(
    "edit, key, value",
    [
        (lambda c: c["data"].__setitem__("format", "avse"), "data.format", "'avse'"),
        (lambda c: c["decode"].__setitem__("shards", 0), "decode.shards", "0"),
        (lambda c: c["encoders"]["vgg19"].__setitem__("batch_size", "big"), "encoders.vgg19.batch_size", "'big'"),
        (lambda c: c["finetune"].__setitem__("temperature", -1), "finetune.temperature", "-1"),
        (lambda c: c["train"].__setitem__("select_on", "tst"), "train.select_on", "'tst'"),
        (lambda c: c.__setitem__("bogus", 1), "<top level>", "bogus"),
    ],
)
def test_errors_name_key_and_value(edit, key, value):
    cfg = _demo()
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg, "demo.yaml")
    msg = str(err.value)
    assert key in msg and value in msg, msg


def test_head_features_must_be_listed():
    cfg = _demo()
    cfg["heads"]["avel"]["features"] = ["vgg19+cnn14"]
    with pytest.raises(ConfigError, match="heads.avel.features"):
        validate(cfg)


def test_feature_pair_needs_configured_encoder():
    cfg = _demo()
    cfg["features"] = ["vgg19+cnn14", "resnet50+vggish"]
    del cfg["encoders"]["cnn14"]
    with pytest.raises(ConfigError, match="cnn14"):
        validate(cfg)


def test_unav_needs_variable_segments():
    cfg = yaml.safe_load((REPO / "workflow/config/unav100.yaml").read_text())
    cfg["decode"]["n_segments"] = 10
    cfg["windows"] = None
    with pytest.raises(ConfigError, match="decode.n_segments"):
        validate(cfg)


def test_invalid_yaml_is_reported(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)


# --- issue 13: every checkable value stopped at validation, naming key and value -------------
@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda c: c["encoders"]["vgg19"].__setitem__("weights", "imagnet"), "encoders.vgg19.weights = 'imagnet'"),
        (lambda c: c["encoders"]["vgg19"].__setitem__("preprocessing", "bogus"),
         "encoders.vgg19.preprocessing = 'bogus'"),
        (lambda c: c["train"].__setitem__("device", "gpu0"), "train.device = 'gpu0'"),
        (lambda c: c["heads"].__setitem__("visual_only", {"settings": ["cml"]}), "heads.visual_only.settings.0 = 'cml'"),
        (lambda c: c["heads"]["ccln"]["hparams"].__setitem__("lamb", 1), "unknown key(s) ['lamb']"),
        (lambda c: c["heads"].__setitem__("audio_only", {"epoch": 1, "setings": ["weak"]}),
         "unknown key(s) ['epoch', 'setings']"),
        (lambda c: c["encoders"]["vggish"].__setitem__("bogus_option", 1), "unknown key(s) ['bogus_option']"),
        (lambda c: c["heads"].__setitem__("dense", {"settings": ["full"]}), "heads.dense: a unav100 head"),
        (lambda c: c["finetune"].__setitem__("encoder", "vggish"), "finetune.encoder = 'vggish'"),
    ],
)
def test_bad_values_are_config_errors(edit, expect):
    cfg = _demo()
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg, "demo.yaml")
    assert expect in str(err.value), str(err.value)


def test_missing_weights_mean_the_official_ones():
    cfg = _demo()
    del cfg["encoders"]["vgg19"]["weights"]
    validate(cfg)
    from avepipe.config import encoder_settings
    from avepipe.encoders import get_encoder

    # None on the command line; the encoder then loads its official default_weights, never random
    assert encoder_settings(cfg, "vgg19")["weights"] is None
    assert get_encoder("vgg19").default_weights in get_encoder("vgg19").official


def test_schema_file_is_generated_from_the_registries():
    """The checked-in schema (what Snakemake's validate reads) equals what options.py and the
    encoder and head registries give; every list of names derives from the registries."""
    from avepipe import heads as H
    from avepipe.config import SCHEMA_PATH, encoder_names, head_names, schema_text
    from avepipe.encoders import ENCODERS

    assert SCHEMA_PATH.read_text() == schema_text(), "run `avepipe schema --write`"
    assert encoder_names() == sorted(ENCODERS)
    assert encoder_names("visual") == sorted(n for n, s in ENCODERS.items() if s.modality == "visual")
    assert head_names() == sorted(H.HEADS)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    for name in H.HEADS:
        sec = schema["heads"]["properties"][name]["properties"]
        assert sec["settings"]["items"]["enum"] == list(H.settings(name))
        assert set(sec["hparams"]["properties"]) == set(H.hparams(name))
    for name, spec in ENCODERS.items():
        sec = schema["encoders"]["properties"][name]
        assert sec["x-modality"] == spec.modality and sec.get("x-sample-rate") == spec.sample_rate
        assert sec["x-official-weights"] == sorted(spec.official)
    assert audio_rates({"encoders": {n: {} for n in ENCODERS}}) == sorted(
        {s.sample_rate for s in ENCODERS.values() if s.sample_rate})
    # the CLI's choices come from the same registries
    from avepipe.cli import build_parser

    assert build_parser("train").parse_args(
        ["train", "--manifest", "m", "--head", "x", "--visual", "v", "--audio", "a", "--out-dir", "o"]).head == "x"


def test_cli_flags_round_trip_every_option():
    """Each stage dataclass: flags rendered for the rules parse back to the same values."""
    import argparse
    import shlex

    from avepipe import options as O

    for cls in (O.SynthOptions, O.IndexOptions, O.DecodeOptions, O.ExtractOptions, O.FinetuneOptions,
                O.TrainOptions, O.HeadOptions, O.EvaluateOptions):
        cfg = _demo()
        section = {"SynthOptions": {"videos": 3}, "IndexOptions": cfg["data"]}.get(cls.__name__, {})
        values = {f.name: O._default(f) for f in O.cli_fields(cls)} | section
        values = {k: v for k, v in values.items() if v is not O.MISSING and k in {f.name for f in O.cli_fields(cls)}}
        p = argparse.ArgumentParser()
        O.add_arguments(p, cls)
        back = O.from_args(cls, p.parse_args(shlex.split(O.to_flags(cls, values))))
        assert {k: getattr(back, k) for k in values} == values, cls.__name__
