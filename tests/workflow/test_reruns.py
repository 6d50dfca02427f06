"""Snakemake reruns on a tiny complete run: nothing to redo, rebuilds are byte-identical,
and each single-stage edit plans exactly that stage and its descendants.

One tiny synthetic AVE-format run (5 videos, 1 shard, ResNet-50 + VGGish on random weights,
1 fine-tuning epoch, AVEL for 2 epochs) is built once per pytest session in a temporary
working directory (~1.5-2 min on 2 shared cores);
`test_lint_report.py` renders its report. The only bytes allowed to differ between a
run and its rebuild are the `created` timestamps of provenance records (the contract
keeps them: docs/contracts.md) and the wall-clock timings of the training history
(`log.jsonl` and the same rows in `checkpoint.pt`: `time_s`, `train_s`, `data_s`, `eval_s`,
`data_share`, `seconds`); Snakemake's logs and benchmark timings are not results.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from . import smk
from .smk import DEMO, job_counts
# not results: Snakemake's own bookkeeping, logs and timings
VOLATILE_PARTS = {"logs", "benchmarks", ".snakemake_timestamp", "report.html"}


# --- the tiny run -------------------------------------------------------------------------
def tiny_config(run: str) -> dict:
    """demo.yaml cut down to the smallest run that still has every stage."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg.update(run=run, also=[])
    cfg["data"].update(root=f"results/{run}/data",
                       synthetic={"videos": 5, "classes": 2, "seed": 0, "min_duration": 10, "max_duration": 11})
    cfg["decode"].update(shards=1, n_segments=10, sample_frames_per_segment=1)
    cfg["encoders"] = {"resnet50": {"weights": "random", "frames_per_segment": 1, "batch_size": 10},
                       "vggish": {"weights": "random"}}
    cfg["features"] = ["resnet50_ft+vggish"]
    cfg["finetune"].update(enabled=True, encoder="resnet50", audio="vggish", epochs=1, batch_size=4,
                           trainable="last:1", temperature=0.2)
    cfg["heads"] = {"avel": {"settings": ["full"], "epochs": 2}}
    cfg["train"].update(seeds=[0], select_on="val")
    cfg.pop("evaluate", None)
    return cfg


def snakemake(*args: str, tiny: dict, env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    """Snakemake on the tiny run's config, in its working directory (targets/options first:
    --configfile and --quiet take several values)."""
    return smk.run(*args, "--cores", "2", "--configfile", str(tiny["config"]), cwd=tiny["dir"], env=env,
                   timeout=timeout)


def tiny_run(request: pytest.FixtureRequest) -> dict:
    """The complete tiny run, built once per session (shared with test_lint_report.py through
    `request.config`) in its own working directory. Returns run, config, results dir, dir."""
    cfg = request.config
    if not hasattr(cfg, "_avepipe_tiny_run"):
        run = "tiny"
        base = request.getfixturevalue("tmp_path_factory").mktemp("session_tiny_run")  # kept by conftest
        path = base / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config(run)))
        tiny = {"run": run, "config": path, "results": base / "results" / run, "dir": base}
        rc, out = snakemake(tiny=tiny)
        assert rc == 0, f"tiny run failed:\n{out[-6000:]}"
        cfg._avepipe_tiny_run = tiny
    return cfg._avepipe_tiny_run


@pytest.fixture
def tiny(request):
    return tiny_run(request)


# --- comparing runs -----------------------------------------------------------------------
def drop_created(obj):
    """JSON value without the provenance timestamps (`created` of each provenance record)."""
    if isinstance(obj, dict):
        return {k: drop_created(v) for k, v in obj.items() if not (k == "created" and "code_fingerprint" in obj)}
    if isinstance(obj, list):
        return [drop_created(v) for v in obj]
    return obj


def drop_timings(row: dict) -> dict:
    """A training-log row without its wall-clock timings (`time_s`, `train_s`, `data_share`...)."""
    return {k: v for k, v in row.items() if not (k.endswith("_s") or k in ("data_share", "seconds"))}


def same_checkpoint(a: Path, b: Path) -> bool:
    """Two training checkpoints equal but for the wall-clock timings of their epoch history
    (the same rows log.jsonl holds): every tensor bit for bit, every other value equal."""
    import torch

    def norm(obj):
        if isinstance(obj, dict):
            obj = drop_timings(obj) if "epoch" in obj and "loss" in obj else obj
            return {k: norm(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [norm(v) for v in obj]
        if isinstance(obj, torch.Tensor):
            return ("tensor", obj.dtype, tuple(obj.shape), obj.cpu().numpy().tobytes())
        return obj

    return norm(torch.load(a, weights_only=True)) == norm(torch.load(b, weights_only=True))


def result_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not VOLATILE_PARTS & set(p.relative_to(root).parts)}


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths whose content differs between result trees a and b: JSON without provenance
    timestamps, training logs (JSON lines) without wall-clock timings, the rest byte for byte."""
    fa, fb = result_files(a), result_files(b)
    diff = sorted(set(fa) ^ set(fb))
    for rel in sorted(set(fa) & set(fb)):
        x, y = fa[rel].read_bytes(), fb[rel].read_bytes()
        if x == y:
            continue
        if rel.endswith(".json") and drop_created(json.loads(x)) == drop_created(json.loads(y)):
            continue
        if rel.endswith(".jsonl"):
            rows = [[drop_timings(json.loads(line)) for line in t.splitlines() if line.strip()] for t in (x, y)]
            if rows[0] == rows[1]:
                continue
        if rel.endswith(".pt") and same_checkpoint(fa[rel], fb[rel]):
            continue
        diff.append(rel)
    return diff


def test_drop_created_only_removes_provenance_timestamps():
    rec = {"created": "x", "a": [{"stage": "s", "code_fingerprint": "f", "created": "t1", "n": 1}]}
    assert drop_created(rec) == {"created": "x", "a": [{"stage": "s", "code_fingerprint": "f", "n": 1}]}


def test_differences_sees_changed_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, n, t in ((a, 1, "t1"), (b, 1, "t2")):
        (d / "s.zarr").mkdir(parents=True)
        (d / "s.zarr" / "zarr.json").write_text(json.dumps({"provenance": {"code_fingerprint": "f", "created": t}}))
        (d / "x.bin").write_bytes(bytes([n]))
        (d / "logs").mkdir()
        (d / "logs" / "l.log").write_text(t)
    assert differences(a, b) == []
    (b / "x.bin").write_bytes(b"\x02")
    (b / "s.zarr" / "zarr.json").write_text(json.dumps({"provenance": {"code_fingerprint": "g", "created": "t"}}))
    assert differences(a, b) == ["s.zarr/zarr.json", "x.bin"]


def test_job_counts_parses_job_stats():
    text = "Job stats:\njob      count\n-----  -------\nall          1\ntrain        2\ntotal        3\n\nReasons:\n"
    assert job_counts(text) == {"all": 1, "train": 2}
    assert job_counts("Nothing to be done (all requested files are present and up to date).") == {}


# --- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_does_nothing(tiny):
    rc, out = snakemake(tiny=tiny)
    assert rc == 0, out[-4000:]
    assert "Nothing to be done" in out, out[-4000:]
    assert job_counts(out) == {}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")
def test_deleted_results_are_rebuilt_identically(tiny):
    res = tiny["results"]
    before = tiny["dir"] / "before"
    shutil.rmtree(before, ignore_errors=True)
    shutil.copytree(res, before, ignore=shutil.ignore_patterns("logs", "benchmarks"))
    shard = res / "features" / "resnet50" / "shard-000.zarr"  # a feature shard no later stage reads
    head = res / "heads" / "avel" / "resnet50_ft+vggish" / "full" / "seed0"
    shutil.rmtree(shard)
    shutil.rmtree(head)

    # head runs are targets of `all`; a feature shard is an intermediate, rebuilt when asked for
    targets = [str(shard.relative_to(tiny["dir"])), "all"]
    rc, plan = snakemake(*targets, "-n", "--quiet", "rules", tiny=tiny)
    assert rc == 0, plan[-4000:]
    assert job_counts(plan) == {"extract": 1, "store_summary": 1, "train": 1, "summary": 1, "all": 1}, plan[-3000:]

    rc, out = snakemake(*targets, tiny=tiny)
    assert rc == 0, out[-4000:]
    assert (shard / "zarr.json").is_file() and (head / "metrics.json").is_file()
    assert differences(before, res) == []
    rc, out = snakemake("-n", tiny=tiny)
    assert "Nothing to be done" in out, out[-3000:]
    # the zarr arrays themselves, not only their files
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(str(before / shard.relative_to(res)), mode="r"), zarr.open_group(str(shard), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for k in ga.array_keys():
        assert np.array_equal(ga[k][...], gb[k][...]), k


def _edited(tiny, name: str, edit) -> Path:
    cfg = yaml.safe_load(Path(tiny["config"]).read_text())
    edit(cfg)
    p = tiny["dir"] / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


ALL_DOWNSTREAM_OF_FT = {"finetune": 1, "extract": 1, "store_summary": 1, "train": 1, "summary": 1, "all": 1}
EDITS = {
    # decode param: every shard's decode, then everything that reads decoded shards
    "decode_param": (lambda c: c["decode"].update(sample_frames_per_segment=2), {},
                     {"decode": 1, "decode_report": 1, "extract": 3, "store_summary": 3, "finetune": 1,
                      "train": 1, "summary": 1, "all": 1}),
    # one encoder's weights: its store, fine-tuning (its audio features) and what follows
    "encoder_weights": (lambda c: c["encoders"]["vggish"].update(weights="random:1"), {},
                        {"extract": 2, "store_summary": 2, "finetune": 1, "train": 1, "summary": 1, "all": 1}),
    # fine-tuning temperature: the fine-tuned weights, their store, the head on them
    "finetune_temperature": (lambda c: c["finetune"].update(temperature=0.1), {}, ALL_DOWNSTREAM_OF_FT),
    # one head's code (salted fingerprint stands in for an edit of avepipe/heads/baselines.py)
    "head_code": (lambda c: None, {"AVEPIPE_FINGERPRINT_SALT": "heads:avel=1"},
                  {"train": 1, "summary": 1, "all": 1}),
    # another head's code: nothing of this run
    "other_head_code": (lambda c: None, {"AVEPIPE_FINGERPRINT_SALT": "heads:ccln=1"}, {}),
    # evaluation settings: the head runs and the summary
    "evaluate": (lambda c: c.update(evaluate={"tious": [0.5]}), {}, {"train": 1, "summary": 1, "all": 1}),
    "select_on": (lambda c: c["train"].update(select_on="test"), {}, {"train": 1, "summary": 1, "all": 1}),
    # a named hyper-parameter variant: only its own training (beside the kept base head) and the summary
    "variant": (lambda c: c["heads"]["avel"].update(variants={"short": {"epochs": 1, "hparams": {"hidden": 64}}}),
                {}, {"train": 1, "summary": 1, "all": 1}),
}


@pytest.mark.slow
def test_single_stage_edits_plan_exactly_their_descendants(tiny):
    # dry runs only: started together (each is mostly Snakemake start-up)
    procs = {}
    for name, (edit, env, _) in EDITS.items():
        cfg = _edited(tiny, name, edit)
        procs[name] = smk.start("-n", "--quiet", "rules", "--cores", "2", "--configfile", str(cfg),
                                cwd=tiny["dir"], env=env)
    plans = {}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}:\n{out[-4000:]}"
        plans[name] = job_counts(out)
    assert plans == {name: want for name, (_, _, want) in EDITS.items()}


def test_fingerprint_salt_changes_only_the_named_stage(monkeypatch):
    from avepipe import provenance as prov

    plain = {s: prov.code_fingerprint(s) for s in ("heads:avel", "heads:ccln", "decode")}
    monkeypatch.setenv(prov.SALT_ENV, "heads:avel=1, decode=x")
    assert prov.fingerprint_salts() == {"heads:avel": "1", "decode": "x"}
    assert prov.code_fingerprint("heads:avel") != plain["heads:avel"]
    assert prov.code_fingerprint("decode") != plain["decode"]
    assert prov.code_fingerprint("heads:ccln") == plain["heads:ccln"]
    salted = prov.code_fingerprint("heads:avel")
    monkeypatch.setenv(prov.SALT_ENV, "heads:avel=2")
    assert prov.code_fingerprint("heads:avel") not in (plain["heads:avel"], salted)
    with pytest.raises(ValueError, match="heads:avel"):
        prov.fingerprint_salts("heads:avel")
