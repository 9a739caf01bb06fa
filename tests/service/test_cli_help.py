"""``reconserve --help``: every option of every subcommand has help text, and the parser (and
so every ``--help`` but train's and data's, whose arguments live with the training code) is
built without importing torch."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import DELEGATED, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_the_parser_imports_no_torch():
    code = "import sys; from service.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_help_answers_without_torch():
    code = ("import sys; from service.cli import main\n"
            "for argv in (['--help'], ['solve', '--help'], ['serve', '--help'], ['models', '--help'], "
            "['import', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "--noise-sigma" in out.stdout and "--ray-address" in out.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_has_help():
    subs = _subparsers(build_parser())
    assert set(DELEGATED) < set(subs)
    for name, sub in subs.items():
        if name in DELEGATED:
            module, add, _, _ = DELEGATED[name]
            sub = getattr(__import__(module, fromlist=[add]), add)(argparse.ArgumentParser())
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"reconserve {name}: {action.dest} has no help text"


@pytest.mark.parametrize("name", sorted(DELEGATED))
def test_train_and_data_help_lists_their_arguments(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
