"""The `avepipe` command: every stage is a subcommand with --help."""
import os
import subprocess
import sys

import pytest

from avepipe.cli import COMMANDS as CLI_COMMANDS
from avepipe.cli import build_parser

COMMANDS = ["validate-config", "schema", "synth", "dataset", "index", "decode", "decode-report", "extract",
            "inspect", "verify", "export-h5", "import-h5", "finetune", "train", "summarize"]


def test_every_stage_has_a_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: avepipe " + cmd in out
    # every option has help text, and every optional one shows its default
    parser = build_parser(cmd)._subparsers._group_actions[0].choices[cmd]
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{cmd} {action.option_strings or action.dest}: no help"
        if action.option_strings and not action.required and action.default not in (None, False):
            assert "default" in action.help, f"{cmd} {action.option_strings}: default not shown"


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AVEPIPE_DEBUG"}
    args = [sys.executable, "-m", "avepipe", "inspect", str(tmp_path / "nowhere.zarr")]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nowhere.zarr" in r.stderr, r.stderr
    r = subprocess.run(args, capture_output=True, text=True, env={**env, "AVEPIPE_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


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


def test_command_table_is_the_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(CLI_COMMANDS)
