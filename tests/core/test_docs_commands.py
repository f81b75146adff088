"""Every ``pilelm ...`` command shown in README.md and docs/*.md parses with the real CLI parser.

Read from the shell blocks (```bash, ```sh, ```shell, ```console) of the pages, so a command a
page adds is checked without an edit here: continuation lines are joined, comments dropped,
pipes and redirections cut (``echo text | pilelm punctuate FT``), environment assignments and
launchers skipped (``PILELM_API_KEY=x pilelm serve``, ``torchrun ... -m pilelm train``). For
each command the subcommand must exist, and every ``--option`` and ``key=value`` override must
name a key of its config (``pilelm run`` / ``demo``: ``STAGE.key`` against that stage's
config); a value is checked too unless it is a placeholder (``N``, ``SHARD_DIR``, ``a|b``).
Nothing runs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilelm.core import runner
from pilelm.core.cli import parse_args, split_command
from pilelm.core.config import ConfigError, load_config, parse_override
from pilelm.core.stages import COMMANDS, resolve_config_path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
OPERATORS = {"|", "||", "&", "&&", ";", "<", ">", ">>", "2>", "(", ")"}
# A value written as a stand-in for the user's own: UPPER_CASE words, alternatives, ellipses, <...>.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_./-]*$|\||\.\.\.|<|\$")


@dataclass(frozen=True)
class ShownCommand:
    page: str
    line: int
    argv: tuple[str, ...]
    """The words after ``pilelm``."""

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: pilelm {shlex.join(self.argv)}"


def _logical_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, text) of each shell line, continuations (a trailing backslash) joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", first_line
    for i, raw in enumerate(block.splitlines()):
        if not pending:
            start = first_line + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _pilelm_words(words: list[str]) -> list[str] | None:
    """The arguments after ``pilelm`` in one simple command, or None if it runs something else."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # FOO=bar pilelm ...
    if words and words[0] == "pilelm":
        return words[1:]
    for module in ("pilelm", "pilelm.core.cli"):  # python -m pilelm ..., torchrun ... -m pilelm ...
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == module:
                return words[i + 2:]
    return None


def shown_commands(page: Path) -> list[ShownCommand]:
    text = page.read_text(encoding="utf-8")
    found = []
    for block in SHELL_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        for line, source in _logical_lines(block.group(1), first):
            lexer = shlex.shlex(source, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                words = list(lexer)
            except ValueError as e:  # an unclosed quote
                raise AssertionError(f"{page.name}:{line}: cannot split {source!r}: {e}") from None
            simple: list[str] = []
            for word in [*words, ";"]:
                if word not in OPERATORS:
                    simple.append(word)
                    continue
                argv = _pilelm_words(simple)
                if argv is not None:
                    name = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
                    found.append(ShownCommand(name, line, tuple(argv)))
                # After a redirection the next word is a file name, not a command.
                simple = ["(a file)"] if word in ("<", ">", ">>", "2>") else []
    return found


COMMANDS_SHOWN = [c for page in PAGES for c in shown_commands(page)]


def _check_keys(cls: type, overrides: list[str], where: str) -> list[str]:
    """The overrides whose key ``cls`` does not have, or whose literal value it refuses."""
    problems = []
    for text in overrides:
        key, value = text.split("=", 1)
        try:
            load_config(cls, overrides=[text])
        except ConfigError as e:
            msg = str(e)
            if msg.startswith("unknown config key") or (not PLACEHOLDER.search(value) and f"{key}:" in msg):
                problems.append(f"{where}: {msg}")
    return problems


def _pipeline_overrides(overrides: list[str], where: str) -> list[str]:
    """``pilelm run`` / ``demo``: ``STAGE.key=value`` checked against that stage's config."""
    problems = []
    for text in overrides:
        path, _ = parse_override(text)
        stage = runner.SECTIONS.get(path[0])
        if stage is None or len(path) < 2:
            continue  # a key of the pipeline config itself: checked by load_config
        cls, _ = COMMANDS[stage].load()
        problems += _check_keys(cls, [f"{'.'.join(path[1:])}={text.split('=', 1)[1]}"], where)
    return problems


def check_command(shown: ShownCommand) -> list[str]:
    argv = list(shown.argv)
    if not argv or argv[0] in ("-h", "--help", "help", "-V", "--version"):
        return []
    name, rest = split_command(argv)
    cmd = COMMANDS.get(name)
    if cmd is None:
        return [f"{shown}: no command {name!r} (commands: {', '.join(COMMANDS)})"]
    if "-h" in rest or "--help" in rest:
        return []
    if "--config" in rest:  # a shipped config by name, or the user's own YAML file
        i = rest.index("--config")
        value = rest[i + 1] if i + 1 < len(rest) else ""
        if not value.endswith((".yaml", ".yml")) or not PLACEHOLDER.search(value.rsplit("/", 1)[-1].split(".")[0]):
            try:
                resolve_config_path(value)
            except ConfigError as e:
                if not value.endswith((".yaml", ".yml")):
                    return [f"{shown}: {e}"]
        rest = rest[:i] + rest[i + 2:]
    cls, _ = cmd.load()
    try:
        _, overrides = parse_args(cmd, cls, rest)
    except ConfigError as e:
        return [f"{shown}: {e}"]
    problems = _check_keys(cls, overrides, str(shown))
    if name in ("run", "demo"):
        problems += _pipeline_overrides(overrides, str(shown))
    return problems


def test_the_docs_show_commands_and_the_reader_finds_them(tmp_path):
    # Guards against passing vacuously: the pages hold many commands, of many stages, and the
    # reader handles continuations, pipes, environment assignments and launchers.
    assert len(COMMANDS_SHOWN) > 50
    assert {"prepare", "train", "eval", "generate", "serve", "finetune"} <= {c.argv[0] for c in COMMANDS_SHOWN}
    sample = "```bash\nFOO=1 pilelm train --data S \\\n  -o R loop.max_steps=3   # a comment\n" \
             "echo hi | pilelm punctuate FT > out.txt\ntorchrun --nproc_per_node 2 -m pilelm eval R --data S\n```\n"
    page = tmp_path / "sample.md"
    page.write_text(sample)
    got = [c.argv for c in shown_commands(page)]
    assert got == [("train", "--data", "S", "-o", "R", "loop.max_steps=3"), ("punctuate", "FT"),
                   ("eval", "R", "--data", "S")]


def test_the_checker_rejects_what_the_cli_rejects():
    bad = [ShownCommand("x.md", 1, ("trian", "--data", "S")),
           ShownCommand("x.md", 2, ("train", "--data", "S", "--max-stepz", "3")),
           ShownCommand("x.md", 3, ("train", "loop.max_stepz=3")),
           ShownCommand("x.md", 4, ("train", "loop.precision=fp8")),
           ShownCommand("x.md", 5, ("run", "tiny", "train.loop.max_stepz=3"))]
    assert all(check_command(c) for c in bad)
    good = ShownCommand("x.md", 6, ("train", "--data", "SHARD_DIR", "--config", "tiny", "loop.max_steps=N"))
    assert check_command(good) == []


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_command_shown_parses(page):
    problems = [p for c in COMMANDS_SHOWN if c.page == page for p in check_command(c)]
    assert not problems, "commands in the docs that the CLI would refuse:\n" + "\n".join(problems)
