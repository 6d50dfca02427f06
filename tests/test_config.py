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
