"""What a user relies on across commands: list options take space-separated values, a wrong key
is an error that suggests the right one, and every inference command defaults to device=auto."""

from __future__ import annotations

import pytest

from pilelm.core.cli import main, parse_args
from pilelm.core.config import ConfigError, load_config
from pilelm.core.stages import COMMANDS


def parsed(command: str, argv: list[str]):
    cls, _ = COMMANDS[command].load()
    return load_config(cls, *parse_args(COMMANDS[command], cls, argv))


def test_list_options_take_space_separated_values():
    cfg = parsed("embed", ["RUN", "--splits", "val", "test", "--data", "prep", "-o", "out"])
    assert cfg.splits == ["val", "test"] and cfg.data == ["prep"] and cfg.run == "RUN"
    cfg = parsed("finetune", ["RUN", "--data", "a.jsonl", "b.jsonl", "loop.max_steps=3"])
    assert cfg.data == ["a.jsonl", "b.jsonl"] and cfg.loop.max_steps == 3
    # repeating the option still works, and a value taken too greedily goes back to a missing positional
    assert parsed("generate", ["RUN", "--prompt", "a", "--prompt", "b"]).prompt == ["a", "b"]
    cfg = parsed("generate", ["--prompt", "a", "b", "RUN"])
    assert cfg.prompt == ["a", "b"] and cfg.run == "RUN"


@pytest.mark.parametrize(("override", "suggestion"), [
    ("data.label_column=x", "did you mean label_column=x"),
    ("loop.lr=0.5", "did you mean optim.lr=0.5"),
    ("max_steps=5", "did you mean loop.max_steps=5"),
    ("lable_column=x", "did you mean label_column=x"),
])
def test_a_wrong_key_is_an_error_with_a_suggestion(override, suggestion):
    cls, _ = COMMANDS["finetune"].load()
    with pytest.raises(ConfigError, match=suggestion):
        load_config(cls, overrides=[override])


def test_a_wrong_option_suggests_the_right_one(capsys):
    assert main(["finetune", "RUN", "--lable-column", "x"]) == 2
    assert "did you mean --label-column" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "generate", "eval", "embed", "search", "audit", "predict", "chat",
                                     "punctuate"])
def test_inference_commands_default_to_device_auto(command):
    cls, _ = COMMANDS[command].load()
    assert cls().device == "auto"
