"""Config values reach the shell quoted: hostile paths and strings come back from the shell
exactly as written, and the values the schema can constrain (device, run name) are refused
before any job. Every rule's command is built by Snakemake itself (`-n -p`)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from avepipe.cli import build_parser

from .smk import DEMO, run

# space, both quotes, command substitution, backticks, `;`, a newline, a leading `-`, non-ASCII
HOSTILE = "-x dir 'a' \"b\" $(touch PWNED) `touch PWNED2`; echo hi\nnext é漢"


def _config(tmp_path: Path) -> tuple[Path, dict]:
    weights = tmp_path / f"w {HOSTILE}.pth"
    weights.write_bytes(b"not read by a dry run")
    cfg = yaml.safe_load(DEMO.read_text())
    cfg.update(run="quoting", also=[])
    cfg["data"]["root"] = HOSTILE  # relative to the working directory, leading "-" and all
    cfg["encoders"]["vggish"]["weights"] = str(weights)
    cfg["heads"]["event_memory"]["hparams"]["branch"] = HOSTILE  # a string hyper-parameter
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path, cfg


def _commands(out: str) -> list[list[str]]:
    """Every `avepipe ...` command of a `-n -p` plan as the shell splits it (newlines inside
    quotes included), without the trailing `> log 2>&1`."""
    cmds = []
    for m in re.finditer(r"avepipe (?=[a-z-]+ )", out):
        words = shlex.split(out[m.start():].split(" 2>&1", 1)[0])
        assert words[-2] == ">", words[-3:]
        cmds.append(words[:-2])
    return cmds


def test_hostile_values_reach_every_command_intact(tmp_path):
    path, cfg = _config(tmp_path)
    rc, out = run("-n", "-p", "--forceall", "--cores", "2", "--configfile", str(path), cwd=tmp_path, timeout=300)
    assert rc == 0, out[-4000:]
    cmds = _commands(out)
    seen = {w[1] for w in cmds}
    assert {"synth", "index", "decode", "decode-report", "extract", "inspect", "finetune", "train",
            "summarize"} <= seen, seen
    checked = set()
    for words in cmds:
        sub = words[1]
        ns = build_parser(sub).parse_args(words[1:])  # the CLI sees exactly the intended values
        if sub == "synth":
            assert str(ns.out) == HOSTILE
            checked.add("data.root (synth)")
        if sub == "index":
            assert ns.root == HOSTILE
            checked.add("data.root (index)")
        if sub == "extract" and ns.encoder == "vggish":
            assert ns.weights == cfg["encoders"]["vggish"]["weights"]
            checked.add("weights")
        if sub == "train" and ns.head == "event_memory":
            assert ns.hparams["branch"] == HOSTILE
            checked.add("hparams")
    assert checked == {"data.root (synth)", "data.root (index)", "weights", "hparams"}
    assert not list(tmp_path.rglob("PWNED*"))


def test_hostile_root_runs_nothing(tmp_path):
    """A real job with the hostile root: the dataset lands in that folder, nothing is executed."""
    path, _ = _config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["synthetic"].update(videos=2)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    rc, out = run("results/quoting/synth.json", "--cores", "1", "--configfile", str(path), cwd=tmp_path,
                  timeout=600)
    assert rc == 0, out[-4000:]
    assert (tmp_path / HOSTILE / "Annotations.txt").is_file()
    assert json.loads((tmp_path / "results/quoting/synth.json").read_text())["root"] == HOSTILE
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("key, value", [
    ("train.device", "cpu$(touch PWNED4)"),
    ("encoders.vgg19.device", "gpu0"),
    ("run", "x; rm -rf y"),
    ("encoders.vggish.weights", "random$(touch PWNED3)"),
])
def test_values_the_schema_constrains_are_refused_before_any_job(tmp_path, key, value):
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["also"] = []
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out = run("-n", "--cores", "1", "--configfile", str(path), cwd=tmp_path, timeout=300)
    assert rc != 0
    assert f"{key} = {value!r}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not list(tmp_path.rglob("PWNED*"))
