"""Snakemake plans of the fine-tuning sides: `finetune.side` audio plans rule `finetune` for the
audio encoder with the visual store as its partner, side both one `finetune_both` job whose two
weight files feed the `<enc>_ft` extractions; `<enc>_ft` of an encoder the side does not train
is a config error before any job."""
from __future__ import annotations

from pathlib import Path

import yaml

from .smk import REPO, args_of, commands, job_counts, run


def _plan(tmp_path: Path, side: str, features: list[str]) -> tuple[int, str, str]:
    """Dry-run (printing shell commands) of demo.yaml with one run, AVEL on ``features``."""
    cfg = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    name = f"ftdry_{side}"
    cfg.update(run=name, also=[], features=features)
    cfg["finetune"].update(side=side)
    cfg["heads"] = {"avel": {"settings": ["full"], "epochs": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out = run("-n", "-p", "--cores", "2", "--configfile", str(path), cwd=tmp_path, timeout=300)
    return rc, out, name


def _commands(out: str, sub: str) -> list[str]:
    return commands(out, sub)


def test_side_audio_plans_finetune_of_the_audio_encoder(tmp_path):
    rc, out, run = _plan(tmp_path, "audio", ["vgg19+vggish", "resnet50+cnn14_ft"])
    assert rc == 0, out[-4000:]
    c = job_counts(out)
    assert c["finetune"] == 1 and "finetune_both" not in c
    (ft,) = map(args_of, _commands(out, "finetune"))
    assert ft["audio"] == "cnn14" and ft["side"] == "audio" and ft["base-weights"] == "cnn14=random"
    assert ft["out-dir"] == f"results/{run}/finetune/cnn14"
    # the frozen partner is the visual encoder's store (finetune.encoder = resnet50), every shard
    assert ft["partner-store"] == [f"results/{run}/features/resnet50/shard-00{i}.zarr" for i in range(2)]
    ext = [args_of(x) for x in _commands(out, "extract") if "/features/cnn14_ft/" in x]
    assert len(ext) == 2 and all(x["weights"] == f"results/{run}/finetune/cnn14/weights.pth" for x in ext)
    assert all(x["encoder"] == "cnn14" for x in ext)
    assert not [x for x in _commands(out, "extract") if "resnet50_ft" in x]  # side audio: no visual _ft
    heads = [args_of(h) for h in _commands(out, "train")]
    assert any(h["features-name"] == "resnet50+cnn14_ft" and f"results/{run}/features/cnn14_ft/shard-000.zarr"
               in h["audio"] for h in heads)


def test_side_both_plans_one_joint_job(tmp_path):
    rc, out, run = _plan(tmp_path, "both", ["resnet50_ft+cnn14_ft", "resnet50+cnn14"])
    assert rc == 0, out[-4000:]
    c = job_counts(out)
    assert c["finetune_both"] == 1 and "finetune" not in c
    (ft,) = map(args_of, _commands(out, "finetune"))
    assert ft["side"] == "both" and ft["encoder"] == "resnet50" and ft["audio"] == "cnn14"
    assert "partner-store" not in ft  # nothing frozen read from a store
    d = f"results/{run}/finetune/resnet50+cnn14"
    assert ft["out-dir"] == d
    ext = [args_of(x) for x in _commands(out, "extract")]
    for enc in ("resnet50", "cnn14"):
        mine = [x for x in ext if f"/features/{enc}_ft/" in x["out"]]
        assert len(mine) == 2 and all(x["weights"] == f"{d}/{enc}.pth" for x in mine), mine
    names = {args_of(h)["features-name"] for h in _commands(out, "train")}
    assert names == {"resnet50_ft+cnn14_ft", "resnet50+cnn14"}
    assert c["train"] == 2


def test_side_visual_is_unchanged(tmp_path):
    rc, out, run = _plan(tmp_path, "visual", ["resnet50_ft+cnn14"])
    assert rc == 0, out[-4000:]
    (ft,) = map(args_of, _commands(out, "finetune"))
    assert ft["encoder"] == "resnet50" and ft["side"] == "visual"
    assert ft["partner-store"][0] == f"results/{run}/features/cnn14/shard-000.zarr"
    assert all("finetune/resnet50/weights.pth" in x for x in _commands(out, "extract") if "_ft/" in x)


def test_ft_features_of_an_untrained_encoder_is_a_config_error(tmp_path):
    rc, out, _ = _plan(tmp_path, "visual", ["resnet50+cnn14_ft"])
    assert rc != 0
    assert "'cnn14_ft' needs" in out and "finetune.side = 'visual' trains resnet50" in out
    rc, out, _ = _plan(tmp_path, "audio", ["resnet50_ft+cnn14"])
    assert rc != 0
    assert "'resnet50_ft' needs" in out and "finetune.side = 'audio' trains cnn14" in out
