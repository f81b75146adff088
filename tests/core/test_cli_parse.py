"""Unit tests of the argument grammar shared by every subcommand (no subprocess, no torch)."""

from dataclasses import dataclass, field

import pytest

from pilelm.core.cli import parse_args
from pilelm.core.config import ConfigError, load_config
from pilelm.core.stages import Command


@dataclass
class Optim:
    lr: float = 1e-3
    """Peak learning rate."""


@dataclass
class Stage:
    inputs: list[str] = field(default_factory=list)
    """Input files."""
    output: str = ""
    """Output directory."""
    vocab_size: int = 100
    """Vocabulary size."""
    verbose: bool = False
    """Log more."""
    prompt: list[str] = field(default_factory=list)
    """Prompts (repeatable)."""
    optim: Optim = field(default_factory=Optim)
    """Optimiser section."""


CMD = Command("x", "m", "Stage", "run", "test", ("inputs",), "pilelm x IN... -o OUT")


def parse(argv):
    path, overrides = parse_args(CMD, Stage, argv)
    return load_config(Stage, path, overrides)


def test_positionals_flags_and_dotted_overrides():
    cfg = parse(["a.jsonl", "b.jsonl.zst", "-o", "out", "--vocab-size", "512", "optim.lr=3e-4", "--verbose"])
    assert cfg.inputs == ["a.jsonl", "b.jsonl.zst"]
    assert cfg.output == "out" and cfg.vocab_size == 512 and cfg.verbose is True
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_repeated_list_flag_and_equals_form():
    cfg = parse(["--prompt", "Hello, world", "--prompt", "Second", "--optim.lr=0.5", "--no-verbose"])
    assert cfg.prompt == ["Hello, world", "Second"]
    assert cfg.optim.lr == 0.5 and cfg.verbose is False


def test_unknown_option_and_unknown_dotted_key_are_errors():
    with pytest.raises(ConfigError, match="--bogus"):
        parse(["--bogus", "1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        parse(["optim.lrr=1"])


def test_config_file_then_cli_wins(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("vocab_size: 7\noptim:\n  lr: 0.25\n")
    cfg = parse(["--config", str(y), "--vocab-size", "9"])
    assert cfg.vocab_size == 9 and cfg.optim.lr == 0.25


def test_unknown_undotted_key_and_option_list_the_valid_keys():
    with pytest.raises(ConfigError, match="vocab_size") as e:
        parse(["bogus=1"])
    assert "'bogus'" in str(e.value) and "optim" in str(e.value)
    with pytest.raises(ConfigError, match="valid keys: .*vocab_size"):
        parse(["--bogus-key", "1"])
