"""The `pilelm` command line: help for every command, errors that say what to do.

Two subprocesses exercise the real entry point (`python -m pilelm`); everything else calls
`cli.main` in-process, since each fresh interpreter pays for importing torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pilelm.core import cli
from pilelm.core.config import iter_fields, to_dict
from pilelm.core.stages import COMMANDS


def _pilelm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pilelm", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_python_m_pilelm_help_lists_every_command():
    res = _pilelm("--help")
    assert res.returncode == 0, res.stderr
    for name in COMMANDS:
        assert f"  {name} " in res.stdout, f"`pilelm --help` does not list {name}"
    assert "--help" in res.stdout


def test_python_m_pilelm_missing_input_says_what_to_run_first(tmp_path):
    res = _pilelm("tokenize", str(tmp_path / "prepared"), "--tokenizer", str(tmp_path / "tok"),
                  "-o", str(tmp_path / "shards"))
    assert res.returncode != 0
    assert "pilelm prepare" in res.stderr or "pilelm tokenizer train" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_lists_keys_with_docs_and_defaults(name, capsys):
    assert cli.main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    cls, _ = COMMANDS[name].load()
    assert out.startswith("usage: ")
    fields = list(iter_fields(cls))
    assert fields, f"{name} has no options"
    for key, _tp, default, doc in fields:
        shown = default if isinstance(default, str | int | float | bool | type(None)) else to_dict(default)
        assert f"  {key}={shown!r}" in out, f"`pilelm {name} --help` lacks {key} with its default"
        assert doc, f"{cls.__name__}.{key} has no docstring"
        assert doc.split()[0] in out


def test_unknown_keys_are_errors_naming_the_valid_ones(capsys):
    assert cli.main(["train", "model.n_layerz=2"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layerz" in err and "model.n_layer" in err and "model.d_model" in err
    assert cli.main(["tokenize", "--bogus-key", "1"]) == 2
    assert "--bogus-key" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "first"),
    [
        (["tokenizer", "train", "{t}/prep", "-o", "{t}/tok"], "pilelm prepare"),
        (["train", "--data", "{t}/shards", "-o", "{t}/run"], "pilelm tokenize"),
        (["eval", "{t}/run", "--data", "{t}/shards", "-o", "{t}/eval"], "pilelm train"),
        (["generate", "{t}/run", "--prompt", "Hi"], "pilelm train"),
    ],
)
def test_missing_input_dir_says_what_to_run_first(argv, first, tmp_path, capsys):
    code = cli.main([a.replace("{t}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code != 0 and first in err, err


def test_prepare_missing_input_file_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["prepare", str(tmp_path / "nope.jsonl.zst"), "-o", str(tmp_path / "p")]) != 0
    assert "nope.jsonl.zst" in capsys.readouterr().err
