"""The ``pilelm`` command line: one table of subcommands, each a config class and a runner.

Every subcommand takes the same shapes of arguments:

    pilelm STAGE [POSITIONAL...] [--config FILE.yaml] [--key VALUE] [--flag] [section.key=VALUE]

``--key VALUE`` and ``key=VALUE`` both set a config field (dashes become underscores);
``--config`` takes a YAML file or the name of a shipped config (``pilelm/configs/NAME.yaml``).
Defaults < YAML < command line. ``pilelm STAGE --help`` lists every key with its doc.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any

from pilelm import __version__
from pilelm.core.config import (
    ConfigError,
    _strip_optional,
    describe_config,
    flat_section_of,
    iter_fields,
    load_config,
)
from pilelm.core.stages import COMMANDS, CONFIG_DIR, Command, resolve_config_path


def _field_type(cls: type, dotted: str) -> Any:
    """The annotated type of a dotted key, or None if there is no such key."""
    tp: Any = cls
    parts = dotted.split(".")
    section = flat_section_of(cls, parts[0]) if parts[0] not in typing.get_type_hints(cls) else None
    for part in [section, *parts] if section else parts:  # a flat section's key (temperature: sampling.temperature)
        inner, _ = _strip_optional(tp)
        if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
            return None
        hints = typing.get_type_hints(inner)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


# `key=value` / `section.key=value` on the command line; anything else is a positional.
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


def _valid_keys(cls: type) -> list[str]:
    return [key for key, *_ in iter_fields(cls)]


def _is_list(tp: Any) -> bool:
    inner, _ = _strip_optional(tp)
    return typing.get_origin(inner) in (list, tuple)


def parse_args(cmd: Command, cls: type, argv: list[str]) -> tuple[str | None, list[str]]:
    """Turn argv into (yaml path, override strings) for ``load_config``."""
    config_path: str | None = None
    overrides: list[str] = []
    lists: dict[str, list[str]] = {}
    bare: list[str] = []
    greedy: list[tuple[str, str]] = []  # values a list option took after its first
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file or a shipped config name")
            config_path = str(resolve_config_path(argv[i + 1]))
            i += 2
            continue
        if tok.startswith("-") and tok not in ("-", "--") and not _looks_numeric(tok):
            name = tok.lstrip("-")
            value: str | None = None
            if "=" in name:
                name, value = name.split("=", 1)
            name = {"o": "output"}.get(name, name).replace("-", "_")
            tp = _field_type(cls, name)
            if tp is None and name.startswith("no_") and _field_type(cls, name[3:]) is not None:
                overrides.append(f"{name[3:]}=false")
                i += 1
                continue
            if tp is None and name in getattr(cls, "RENAMED", {}):
                raise ConfigError(f"option {tok!r} of `pilelm {cmd.name}` is now {cls.RENAMED[name]}")
            if tp is None:
                close = difflib.get_close_matches(name, _valid_keys(cls), n=2, cutoff=0.6)
                hint = f"; did you mean {' or '.join('--' + k.replace('_', '-') for k in close)}?" if close else ""
                raise ConfigError(
                    f"unknown option {tok!r} for `pilelm {cmd.name}`{hint}; valid keys: {', '.join(_valid_keys(cls))}"
                )
            inner, _ = _strip_optional(tp)
            if value is None and inner is bool:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is not None and nxt.lower() in ("true", "false", "yes", "no", "1", "0"):
                    value, i = nxt, i + 1
                else:
                    value = "true"
            elif value is None:
                if i + 1 >= len(argv):
                    raise ConfigError(f"option {tok} needs a value")
                value, i = argv[i + 1], i + 1
            if _is_list(tp):
                # A list option takes every value up to the next option: --splits val test
                values = lists.setdefault(name, [])
                values.append(value)
                while i + 1 < len(argv) and _is_value(argv[i + 1]):
                    i += 1
                    values.append(argv[i])
                    greedy.append((name, argv[i]))
            else:
                overrides.append(_override(cls, name, value))
            i += 1
            continue
        if "=" in tok and _KEY.match(tok.split("=", 1)[0]):
            key, value = tok.split("=", 1)
            overrides.append(_override(cls, key.replace("-", "_"), value))  # load_config reports an unknown key
        else:
            bare.append(tok)
        i += 1
    pos = list(cmd.positionals)
    # `pilelm generate --prompt hi RUN_DIR`: a value a list option took past its first goes back
    # to the positionals that would otherwise be missing.
    missing = [p for p in pos[len(bare):] if p not in lists and not _is_list(_field_type(cls, p))]
    while missing and greedy and _required_positional(cls, missing[0]):
        name, value = greedy.pop()
        lists[name].pop()
        bare.append(value)
        missing.pop(0)
    while bare:
        if not pos:
            raise ConfigError(f"unexpected argument {bare[0]!r}; usage: {cmd.usage}")
        name = pos.pop(0)
        if _is_list(_field_type(cls, name)):
            lists.setdefault(name, []).extend(bare)
            bare = []
        else:
            lists.setdefault(name, []).append(bare.pop(0))
    for name, values in lists.items():
        if _is_list(_field_type(cls, name)):
            overrides.append(f"{name}={_yaml_list(values)}")
        else:
            overrides.append(f"{name}={values[-1]}")
    return config_path, overrides


def _override(cls: type, name: str, value: str) -> str:
    """``name=value`` for ``load_config``, which reads the value as YAML; a string field's value
    is quoted so that it stays the text typed (``--host ::`` is an address, not a YAML mapping)."""
    inner, _ = _strip_optional(_field_type(cls, name))
    if inner is str:
        import json

        return f"{name}={json.dumps(value)}"
    return f"{name}={value}"


def _yaml_list(values: list[str]) -> str:
    import json

    return json.dumps(values)


def _is_value(tok: str) -> bool:
    """A token that is neither an option (``--x``) nor a ``key=value`` override."""
    if tok.startswith("-") and tok not in ("-", "--") and not _looks_numeric(tok):
        return False
    return not ("=" in tok and _KEY.match(tok.split("=", 1)[0]))


def _required_positional(cls: type, name: str) -> bool:
    """A positional whose default is empty (the run or model directory a command needs)."""
    return getattr(cls(), name, None) in ("", None)


def _looks_numeric(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def main_help() -> str:
    lines = [
        f"pilelm {__version__}: from raw Pile shards to a trained, evaluated, served language model",
        "",
        "usage: pilelm COMMAND [ARGS...] [--config NAME|FILE] [--key VALUE] [section.key=value ...]",
        "",
        "commands:",
    ]
    width = max(len(n) for n in COMMANDS)
    for c in COMMANDS.values():
        lines.append(f"  {c.name:<{width}}  {c.summary}")
        lines.append(f"  {'':<{width}}    {c.usage}")
    lines += [
        "",
        "`pilelm COMMAND --help` lists every option of that command with its doc and default.",
        f"shipped configs (--config NAME): {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}",
    ]
    return "\n".join(lines)


def command_help(cmd: Command, cls: type) -> str:
    return "\n".join(
        [
            f"usage: {cmd.usage}",
            "",
            cmd.summary,
            "",
            "Every key below can be given as --key VALUE, key=VALUE, or in a --config YAML file.",
            "",
            "options:",
            describe_config(cls),
        ]
    )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def command_groups() -> dict[str, list[str]]:
    """First word of each two-word command (``tokenizer``, ``shards``, ...) -> their usages."""
    groups: dict[str, list[str]] = {}
    for name, cmd in COMMANDS.items():
        if " " in name:
            groups.setdefault(name.split()[0], []).append(cmd.usage)
    return groups


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(command name, its arguments) of a command line after ``pilelm``: a two-word command
    (``pilelm tokenizer train``, ``pilelm shards export``) takes the second word too."""
    if len(argv) > 1 and argv[0] in command_groups():
        return f"{argv[0]} {argv[1]}", argv[2:]
    return argv[0], argv[1:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    groups = command_groups()
    if argv[0] in groups and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print("usage:\n  " + "\n  ".join(groups[argv[0]]) + f"\nsee `pilelm {argv[0]} SUBCOMMAND --help`")
        return 0 if len(argv) > 1 else 2
    name, rest = split_command(argv)
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"pilelm: unknown command {name!r}\n\n{main_help()}", file=sys.stderr)
        return 2
    cls, runner = cmd.load()
    if "-h" in rest or "--help" in rest:
        print(command_help(cmd, cls))
        return 0
    setup_logging()
    try:
        config_path, overrides = parse_args(cmd, cls, rest)
        cfg = load_config(cls, config_path, overrides)
    except ConfigError as e:
        print(f"pilelm {cmd.name}: {e}", file=sys.stderr)
        return 2
    try:
        result = runner(cfg)
    except KeyboardInterrupt:
        print(f"pilelm {cmd.name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:
        # Input and config problems are the user's to fix: say what, without a traceback.
        print(f"pilelm {cmd.name}: error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str | Path):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
