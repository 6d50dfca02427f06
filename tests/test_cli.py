"""The `avepipe` command: every stage is a subcommand with --help."""
import os
import subprocess
import sys

import pytest

from avepipe.cli import build_parser

COMMANDS = ["validate-config", "synth", "dataset", "index", "decode", "decode-report", "extract", "inspect",
            "export-h5", "import-h5", "finetune", "train", "summarize"]


def test_every_stage_has_a_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: avepipe " + cmd in capsys.readouterr().out


def test_module_entry_point_and_config_error(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("run: x\ndata: {format: ave, root: /nowhere}\ndecode: {shards: -1}\n")
    r = subprocess.run([sys.executable, "-m", "avepipe", "validate-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "decode.shards = -1" in r.stderr


def test_cli_turns_on_huge_pages_unless_told_not_to(monkeypatch):
    """main() asks torch's allocator for transparent huge pages (before torch is imported by
    any stage); a value already in the environment wins."""
    from avepipe import cli

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_dense_head_refuses_bf16_clearly():
    from types import SimpleNamespace

    from avepipe.dense_train import train_dense_from_cli

    with pytest.raises(SystemExit, match="dense UnAV-100 head trains in float32"):
        train_dense_from_cli(SimpleNamespace(precision="bf16", manifest="/nowhere.parquet"))
