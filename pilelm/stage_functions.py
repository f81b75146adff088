"""Every ``pilelm`` command as a Python function: ``pilelm.train(data=..., output=..., config="tiny")``.

A function takes the command's bare arguments positionally (``pilelm.prepare("raw/", output=
"prep")``, ``pilelm.eval("runs/a", "runs/b", data="shards")``), its keys as keyword arguments
(a section as a dict, ``loop={"max_steps": 100}``, or dotted, ``**{"loop.max_steps": 100}``),
and ``config=`` a YAML file or shipped config name. It builds the same config object the
command line builds (``pilelm.core.config.load_config``: defaults < YAML < keys, unknown keys
an error) and calls the same runner, so ``pilelm.fine_tune(...)`` is ``pilelm finetune ...``.
Names: the command's, with spaces and dashes as underscores (``tokenizer_train``,
``shards_export``, ``finetune_contrastive``, ``compress_report``), except where a keyword or a
subpackage holds the name: ``import_``, ``fine_tune`` (``pilelm finetune``) and ``serve_http``.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Any

from pilelm.core.config import ConfigError, load_config
from pilelm.core.stages import COMMANDS, resolve_config_path

# Where the command's own name is taken: a keyword, or a subpackage of pilelm (importing
# ``pilelm.finetune.stage`` sets ``pilelm.finetune`` to the package, hiding any function).
RENAMED = {"import": "import_", "finetune": "fine_tune", "serve": "serve_http"}


def python_name(command: str) -> str:
    name = command.replace(" ", "_").replace("-", "_")
    return RENAMED.get(name, name)


FUNCTIONS: dict[str, str] = {python_name(c): c for c in COMMANDS}
"""Python name -> command name."""


def _nest(keys: dict[str, Any]) -> dict[str, Any]:
    """``{"loop.max_steps": 5, "optim": {"lr": 1e-3}}`` -> one nested mapping."""
    out: dict[str, Any] = {}
    for key, value in keys.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is given both as a value and as a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def build_config(command: str, args: tuple[Any, ...] = (), config: str | None = None, **keys: Any) -> Any:
    """The config object ``pilelm COMMAND ARGS... --config CONFIG key=value...`` builds."""
    from pilelm.core.config import _strip_optional

    cmd = COMMANDS[command]
    cls, _ = cmd.load()
    values = dict(keys)
    pos = list(cmd.positionals)
    rest = list(args)
    hints = typing.get_type_hints(cls)
    while rest:
        if not pos:
            raise ConfigError(f"pilelm.{python_name(command)}() takes {len(cmd.positionals)} positional "
                              f"argument(s) ({', '.join(cmd.positionals) or 'none'}); pass the rest by name")
        name = pos.pop(0)
        if name in values:
            raise ConfigError(f"{name} given both positionally and by name")
        inner, _ = _strip_optional(hints[name])
        if typing.get_origin(inner) in (list, tuple):
            values[name] = [str(a) for a in rest]
            rest = []
        else:
            values[name] = str(rest.pop(0))
    for name, value in list(values.items()):
        if name in hints and not isinstance(value, str | int | float | bool | dict | list | tuple | type(None)):
            values[name] = str(value)  # pathlib.Path and friends, as the command line gives them
        elif isinstance(value, list | tuple):
            values[name] = [str(v) if hasattr(v, "__fspath__") else v for v in value]
    path = str(resolve_config_path(config)) if config else None
    return load_config(cls, path, _nest(values))


def run_command(command: str, *args: Any, config: str | None = None, **keys: Any) -> Any:
    """Build the command's config from ``args`` and ``keys``, then run it; returns what its runner
    returns (usually the output directory)."""
    cfg = build_config(command, args, config, **keys)
    _, runner = COMMANDS[command].load()
    return runner(cfg)


@functools.cache
def stage_function(name: str) -> Callable[..., Any]:
    command = FUNCTIONS[name]
    cmd = COMMANDS[command]

    def stage(*args: Any, config: str | None = None, **keys: Any) -> Any:
        return run_command(command, *args, config=config, **keys)

    stage.__name__ = stage.__qualname__ = name
    stage.__doc__ = (f"{cmd.summary}.\n\nThe command line's `{cmd.usage}`; positional: "
                     f"{', '.join(cmd.positionals) or 'none'}. Keys: `pilelm {command} --help`.")
    return stage
