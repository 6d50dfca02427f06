"""Shared decoding in the workflow: with two visual encoders a `frames` job per shard decodes
each video once for both; the features equal those of each encoder decoding on its own
(bit for bit on the CPU); a changed option of one encoder plans that encoder's store (and
what reads it), never the other's and never the frames job; a second run does nothing.

One tiny synthetic run (3 videos, 1 shard, VGG-19 with the AVE script's recipe + ResNet-50,
random weights, no heads) in a temporary working directory (~2-3 min on 2 shared cores).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from . import smk
from .smk import DEMO, job_counts


def shared_config(run: str) -> dict:
    cfg = yaml.safe_load(DEMO.read_text())
    cfg.update(run=run, also=[], features=[], heads={})
    cfg["data"].update(root=f"results/{run}/data",
                       synthetic={"videos": 3, "classes": 2, "seed": 0, "min_duration": 10, "max_duration": 11})
    cfg["decode"].update(shards=1, n_segments=10, sample_frames_per_segment=0)
    cfg["encoders"] = {
        "vgg19": {"weights": "random", "preprocessing": "ave", "frames_per_segment": 1, "batch_size": 10,
                  "threads": 2},
        "resnet50": {"weights": "random", "frames_per_segment": 2, "batch_size": 10, "threads": 2},
    }
    cfg["finetune"] = {"enabled": False}
    cfg["train"].update(seeds=[0])
    cfg.pop("evaluate", None)
    return cfg


def _write(base: Path, name: str, cfg: dict) -> Path:
    p = base / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _snakemake(base: Path, config: Path, *args: str, env: dict | None = None) -> tuple[int, str]:
    return smk.run(*args, "--cores", "2", "--configfile", str(config), cwd=base, env=env, timeout=1200)


def _plan(base: Path, config: Path, env: dict | None = None) -> tuple[dict, list[str]]:
    """Jobs per rule and the encoders of the planned extract jobs."""
    rc, out = _snakemake(base, config, "-n", "-p", env=env)
    assert rc == 0, out[-4000:]
    encoders = sorted(smk.args_of(c)["encoder"] for c in smk.commands(out, "extract"))
    return job_counts(out), encoders


def _features(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")["features"][...])


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("frames_shared")
    run = "shared"
    cfg = shared_config(run)
    config = _write(base, "config", cfg)
    rc, out = _snakemake(base, config)
    assert rc == 0, f"shared run failed:\n{out[-6000:]}"
    res = base / "results" / run
    kept = base / "first"
    shutil.copytree(res / "features", kept)
    return {"base": base, "cfg": cfg, "config": config, "res": res, "first": kept, "log": out}


@pytest.mark.slow
def test_one_frames_job_feeds_both_encoders_and_is_emptied(shared_run):
    res = shared_run["res"]
    log = shared_run["log"]
    assert "rule frames:" in log and "rule frames_done:" in log
    for enc in ("vgg19", "resnet50"):
        text = (res / "logs" / "extract" / enc / "shard-000.log").read_text()
        assert "frames from the store for 3, decoded here for 0" in text, text[-2000:]
        stats = json.loads((res / "benchmarks" / "extract" / enc / "shard-000.json").read_text())
        assert stats["frames_from"] == {"store": 3, "decoded": 0}
        assert 0.0 <= stats["data_wait_share"] <= 1.0 and stats["videos"] == 3
    # the two recipes (by index + cv2 resize; by time + resize 232/crop 224) were written once
    text = (res / "logs" / "frames" / "shard-000.log").read_text()
    assert "2 recipe(s)" in text, text[-2000:]
    # emptied once both readers had finished: only the folder and its note are left
    store = res / "frames" / "shard-000.zarr"
    assert sorted(p.name for p in store.iterdir()) == ["EMPTIED"]
    assert (res / "frames" / "shard-000.done").is_file()


@pytest.mark.slow
def test_second_run_does_nothing(shared_run):
    rc, out = _snakemake(shared_run["base"], shared_run["config"], "-n")
    assert rc == 0, out[-3000:]
    assert "Nothing to be done" in out and job_counts(out) == {}, out[-3000:]


def _edited(run: dict, name: str, edit) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(run["cfg"]))
    edit(cfg)
    return _write(run["base"], name, cfg)


ONE_STORE = {"frames_reader": 1, "extract": 1, "frames_done": 1, "store_summary": 1, "all": 1}
EDITS = {
    # a compute option of one encoder: that encoder's store only, no new decoding job
    "vgg19_batch": (lambda c: c["encoders"]["vgg19"].update(batch_size=7), None, ONE_STORE, ["vgg19"]),
    # its frame recipe (frames per segment): still that store only (it decodes on its own)
    "vgg19_recipe": (lambda c: c["encoders"]["vgg19"].update(frames_per_segment=3), None, ONE_STORE, ["vgg19"]),
    "resnet50_recipe": (lambda c: c["encoders"]["resnet50"].update(preprocessing="imagenet1k_v1"), None,
                        ONE_STORE, ["resnet50"]),
    # one encoder's code
    "resnet50_code": (lambda c: None, {"AVEPIPE_FINGERPRINT_SALT": "extract:resnet50=1"}, ONE_STORE, ["resnet50"]),
    # a recipe of one and a compute option of the other at once: both, each seen
    "both": (lambda c: (c["encoders"]["vgg19"].update(frames_per_segment=3),
                        c["encoders"]["resnet50"].update(batch_size=3)), None,
             {"frames_reader": 2, "extract": 2, "frames_done": 1, "store_summary": 2, "all": 1},
             ["resnet50", "vgg19"]),
    # the decoded shard itself: everything after decode, the frames job included
    "decode": (lambda c: c["decode"].update(sample_frames_per_segment=1), None,
               {"decode": 1, "decode_report": 1, "frames": 1, "extract": 2, "frames_done": 1,
                "store_summary": 2, "all": 1}, ["resnet50", "vgg19"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_plans_exactly_its_own_store(shared_run, name):
    edit, env, jobs, encoders = EDITS[name]
    assert _plan(shared_run["base"], _edited(shared_run, name, edit), env) == (jobs, encoders)


@pytest.mark.slow
def test_rerun_alone_decodes_itself_and_equals_the_shared_features(shared_run):
    """Both encoders rerun on their own (decode workers off: the same numbers, another
    route): each decodes its videos itself, as a job of a single visual encoder does, and
    the features equal those computed from the shared frames bit for bit."""
    res, first = shared_run["res"], shared_run["first"]
    config = _edited(shared_run, "inline", lambda c: [c["encoders"][e].update(num_workers=0)
                                                     for e in ("vgg19", "resnet50")])
    rc, out = _snakemake(shared_run["base"], config)
    assert rc == 0, out[-4000:]
    assert "rule frames:" not in out
    for enc in ("vgg19", "resnet50"):
        text = (res / "logs" / "extract" / enc / "shard-000.log").read_text()
        assert "frames from the store for 0, decoded here for 3" in text, text[-2000:]
        got, want = _features(res / "features" / enc / "shard-000.zarr"), _features(first / enc / "shard-000.zarr")
        assert got.shape == want.shape and np.abs(want).max() > 0
        np.testing.assert_array_equal(got, want)
    rc, out = _snakemake(shared_run["base"], config, "-n")
    assert "Nothing to be done" in out, out[-3000:]
