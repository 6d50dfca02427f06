"""Snakemake plans: the demo DAG, `ave.yaml` / `unav100.yaml` on real-layout roots, config errors."""
import json
import re
import shlex

import pytest
import yaml

from .smk import REPO, args_of, commands, dry_run, job_counts, run


def test_demo_plans_every_stage(tmp_path):
    rc, out = dry_run(cwd=tmp_path)
    assert rc == 0, out
    c = job_counts(out)
    assert c["synth"] == 2 and c["index"] == 2
    assert c["decode"] == 4  # 2 shards x (AVE demo + UnAV demo)
    assert c["finetune"] == 1
    # 6 heads on vgg19+vggish, AVEL also on resnet50(+_ft)+cnn14, + the dense head (UnAV)
    assert c["train"] == 6 + 2 + 1
    assert c["summary"] == 2


def _config(tmp_path, name, **edits):
    cfg = yaml.safe_load((REPO / "workflow/config" / name).read_text())
    for k, v in edits.items():
        sec, key = k.split("__")
        cfg[sec][key] = v
    cfg["run"] = f"dryrun_{tmp_path.name}"
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_ave_config_plans_one_decode_job_per_shard(tmp_path):
    from avepipe.datasets.synthetic import make_ave

    root = tmp_path / "AVE_Dataset"
    make_ave(root, videos=6, seed=3, classes=3)
    cfg = _config(tmp_path, "ave.yaml", data__root=str(root), decode__shards=5)
    rc, out = dry_run("--configfile", str(cfg), cwd=tmp_path)
    assert rc == 0, out
    c = job_counts(out)
    assert c["decode"] == 5
    assert c["extract"] == 5 * 5  # 4 encoders + resnet50_ft
    assert "synth" not in c  # a real dataset is never generated


@pytest.mark.slow  # the 10,790-video DAG takes ~2.5 min to build on 2 cores
def test_unav_config_plans_full_dataset(tmp_path):
    root = tmp_path / "unav"
    (root / "annotations").mkdir(parents=True)
    shared = REPO.parent / "shared" / "data" / "unav100" / "unav100_annotations.json"
    if not shared.exists():
        pytest.skip("../shared absent")
    (root / "annotations" / "unav100_annotations.json").write_text(shared.read_text())
    # no videos here: planning the whole dataset needs the preflight's missing-video limit lifted
    cfg = _config(tmp_path, "unav100.yaml", data__root=str(root), data__max_missing=1.0)
    rc, out = dry_run("--configfile", str(cfg), cwd=tmp_path)
    assert rc == 0, out
    c = job_counts(out)
    assert c["decode"] == 64 and c["extract"] == 128 and c["train"] == 1


def test_config_error_stops_before_any_job(tmp_path):
    cfg = _config(tmp_path, "ave.yaml", decode__shards="many")
    rc, out = dry_run("--configfile", str(cfg), cwd=tmp_path)
    assert rc != 0
    assert "decode.shards = 'many'" in out


def test_list_and_string_hparams_reach_the_cli_intact(tmp_path):
    # the demo's event_memory sets a list hparam; shell word-splitting must not break it
    target = "results/demo/heads/event_memory/vgg19+vggish/full/seed0/metrics.json"
    rc, out = run("-n", "-p", "--forceall", "--cores", "2", target, cwd=tmp_path, timeout=300)
    assert rc == 0, out
    cmd = next(c for c in commands(out, "train") if "event_memory" in c)
    words = shlex.split(cmd.split("avepipe train", 1)[1].split(" > ")[0])
    hp = json.loads(next(w.split("=", 1)[1] for w in words if w.startswith("--hparams=")))
    cfg = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    assert hp == cfg["heads"]["event_memory"]["hparams"] and isinstance(hp["lambdas"], list)
    # train.precision reaches the command (schema default float32)
    assert f"--precision={cfg['train'].get('precision', 'float32')}" in words


def test_demo_schedules_the_finetuning_path_first_with_one_thread_extraction(tmp_path):
    rc, out = run("-n", "-F", "--cores", "2", cwd=tmp_path, timeout=300)
    assert rc == 0, out
    jobs = [b for b in re.split(r"\n(?=(?:local)?rule \w+:)", out) if re.match(r"(?:local)?rule \w+:", b)]
    prio = {re.search(r"wildcards: (.*)", b).group(1): int(re.search(r"priority: (\d+)", b).group(1))
            for b in jobs if "priority:" in b}
    # demo: side visual with cnn14 as the frozen partner -> cnn14 stores and the resnet50_ft re-extraction;
    # the readers of a shared frames store (vgg19, resnet50) run before the next frames job (priority 1)
    assert sorted(prio.values()) == [1, 1, 1, 1, 10, 10, 10, 10, 20]
    assert all("enc=cnn14" in w or "enc=resnet50_ft" in w for w, p in prio.items() if p == 10)
    assert all("enc=vgg19" in w or "enc=resnet50," in w for w, p in prio.items() if p == 1)
    extract = [b for b in jobs if b.startswith("rule extract:")]
    assert extract and not any("threads:" in b for b in extract)  # 1 thread (snakemake prints only > 1)


def test_variants_train_beside_their_head(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    cfg.update(run="variants", also=[])
    cfg["heads"] = {"ccln": {**cfg["heads"]["ccln"], "variants": {"lam1": {"hparams": {"lam": 1.5}, "epochs": 3}}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out = run("-n", "-p", "--cores", "2", "--configfile", str(path), cwd=tmp_path, timeout=300)
    assert rc == 0, out[-3000:]
    trains = {a["head"]: a for a in map(args_of, commands(out, "train"))}
    assert set(trains) == {"ccln", "ccln@lam1"}
    base, var = trains["ccln"], trains["ccln@lam1"]
    assert json.loads(var["hparams"]) == {**cfg["heads"]["ccln"]["hparams"], "lam": 1.5}  # merged over the head's
    assert var["epochs"] == "3" and base["epochs"] == str(cfg["heads"]["ccln"]["epochs"])
    assert var["out-dir"] == "results/variants/heads/ccln@lam1/vgg19+vggish/full/seed0"
    assert base["out-dir"] == "results/variants/heads/ccln/vgg19+vggish/full/seed0"


def test_demo_test_split_is_large_and_has_every_class():
    """The demo's AVE test split (as the generator plans it from demo.yaml, nothing rendered):
    >= 200 segments, so one segment moves an accuracy by at most 0.5 points, with every
    class in train, val and test; and training keeps the larger share."""
    from collections import Counter

    from avepipe.datasets.synthetic import plan_ave

    syn = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())["data"]["synthetic"]
    _, df, split = plan_ave(syn["videos"], syn["seed"], syn["classes"], split_fractions=tuple(syn["split"]))
    n = Counter(split)
    assert n["test"] * 10 >= 200 and n["train"] > n["test"], n
    for name in ("train", "val", "test"):
        assert set(df.loc[split == name, "category"]) == set(df["category"]), name
