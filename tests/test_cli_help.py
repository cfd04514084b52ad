"""`kvpool --version`, and help for every flag and subcommand (issue 9, items 16 and 24)."""
import argparse

import pytest

import kvpool
from kvpool.cli import build_parser, main


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag):
    assert main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == f"kvpool {kvpool.__version__}\n" and err == ""


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_has_a_description_and_every_flag_a_help_text():
    missing = []
    for name, sub in _subparsers().items():
        if not sub.description:
            missing.append(f"{name}: description")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize("command,flag", [
    ("comm", "--plot"), ("comm", "--pp"), ("comm", "--pp-interconnect"),
    ("scale", "--tp"), ("scale", "--tensor-parallel-size"),
    ("models", "--tp"), ("gpus", "--tp"),
])
def test_subcommands_do_not_offer_flags_they_ignore(command, flag):
    sub = _subparsers()[command]
    offered = {s for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert flag not in offered


def test_help_reads_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for name in _subparsers():
        assert main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(len(line) <= 80 for line in out.splitlines()), name
