"""Snakemake plans of the fine-tuning sides: `finetune.side` audio plans rule `finetune` for the
audio encoder with the visual store as its partner, side both one `finetune_both` job whose two
weight files feed the `<enc>_ft` extractions; `<enc>_ft` of an encoder the side does not train
is a config error before any job."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from .test_dryrun import REPO, job_counts

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _plan(tmp_path: Path, side: str, features: list[str]) -> tuple[int, str, str]:
    """Dry-run (printing shell commands) of demo.yaml with one run, AVEL on ``features``."""
    cfg = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    run = f"ftdry_{side}_{tmp_path.name}"
    cfg.update(run=run, also=[], features=features)
    cfg["finetune"].update(side=side)
    cfg["heads"] = {"avel": {"settings": ["full"], "epochs": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*SNAKEMAKE, "-n", "-p", "--cores", "2", "--configfile", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr, run


def _commands(out: str, sub: str) -> list[str]:
    """The `avepipe <sub>` shell commands of the plan (one per job)."""
    return sorted(set(re.findall(rf"^\s*(?:Shell command: )?(avepipe {sub} .*)$", out, re.M)))


def test_side_audio_plans_finetune_of_the_audio_encoder(tmp_path):
    rc, out, run = _plan(tmp_path, "audio", ["vgg19+vggish", "resnet50+cnn14_ft"])
    assert rc == 0, out[-4000:]
    c = job_counts(out)
    assert c["finetune"] == 1 and "finetune_both" not in c
    (ft,) = _commands(out, "finetune")
    assert "--encoder cnn14 " in ft and "--side audio " in ft
    assert f"--out-dir results/{run}/finetune/cnn14 " in ft
    # the frozen partner is the visual encoder's store (finetune.encoder = resnet50), every shard
    partner = re.search(r"--partner-store (.*?) --", ft).group(1).split()
    assert partner == [f"results/{run}/features/resnet50/shard-00{i}.zarr" for i in range(2)]
    ext = [x for x in _commands(out, "extract") if "/features/cnn14_ft/" in x]
    assert len(ext) == 2 and all(f"--weights results/{run}/finetune/cnn14/weights.pth " in x for x in ext)
    assert all("--encoder cnn14 " in x for x in ext)
    assert not [x for x in _commands(out, "extract") if "resnet50_ft" in x]  # side audio: no visual _ft
    heads = _commands(out, "train")
    assert any("--features-name resnet50+cnn14_ft " in h and "/features/cnn14_ft/shard-000.zarr" in h for h in heads)


def test_side_both_plans_one_joint_job(tmp_path):
    rc, out, run = _plan(tmp_path, "both", ["resnet50_ft+cnn14_ft", "resnet50+cnn14"])
    assert rc == 0, out[-4000:]
    c = job_counts(out)
    assert c["finetune_both"] == 1 and "finetune" not in c
    (ft,) = _commands(out, "finetune")
    assert "--side both " in ft and "--encoder resnet50 " in ft and "--audio-encoder cnn14 " in ft
    assert "--partner-store" not in ft  # nothing frozen read from a store
    d = f"results/{run}/finetune/resnet50+cnn14"
    assert f"--out-dir {d} " in ft
    ext = _commands(out, "extract")
    for enc in ("resnet50", "cnn14"):
        mine = [x for x in ext if f"/features/{enc}_ft/" in x]
        assert len(mine) == 2 and all(f"--weights {d}/{enc}.pth " in x for x in mine), mine
    heads = _commands(out, "train")
    assert any("--features-name resnet50_ft+cnn14_ft " in h for h in heads)
    assert any("--features-name resnet50+cnn14 " in h for h in heads)
    assert c["train"] == 2


def test_side_visual_is_unchanged(tmp_path):
    rc, out, run = _plan(tmp_path, "visual", ["resnet50_ft+cnn14"])
    assert rc == 0, out[-4000:]
    (ft,) = _commands(out, "finetune")
    assert "--encoder resnet50 " in ft and "--side visual " in ft
    assert re.search(r"--partner-store (.*?) --", ft).group(1).split()[0] == f"results/{run}/features/cnn14/shard-000.zarr"
    assert all(f"finetune/resnet50/weights.pth" in x for x in _commands(out, "extract") if "_ft/" in x)


def test_ft_features_of_an_untrained_encoder_is_a_config_error(tmp_path):
    rc, out, _ = _plan(tmp_path, "visual", ["resnet50+cnn14_ft"])
    assert rc != 0
    assert "'cnn14_ft' needs" in out and "finetune.side = 'visual' trains resnet50" in out
    rc, out, _ = _plan(tmp_path, "audio", ["resnet50_ft+cnn14"])
    assert rc != 0
    assert "'resnet50_ft' needs" in out and "finetune.side = 'audio' trains cnn14" in out
