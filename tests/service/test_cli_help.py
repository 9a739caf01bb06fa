"""``reconserve --help``: every option of every subcommand has help text, and the parser (so
every ``--help``) is built without importing torch."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_the_parser_imports_no_torch():
    code = "import sys; from service.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_help_answers_without_torch():
    code = ("import sys; from service.cli import main\n"
            "for argv in (['--help'], ['solve', '--help'], ['serve', '--help'], ['models', '--help'], "
            "['import', '--help'], ['train', '--help'], ['data', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "--noise-sigma" in out.stdout and "--ray-address" in out.stdout and "--ema-halflife-kimg" in out.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_has_help():
    subs = _subparsers(build_parser())
    assert {"models", "solve", "serve", "import", "train", "data"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"reconserve {name}: {action.dest} has no help text"


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
