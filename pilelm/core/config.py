"""Typed configs: dataclasses loaded from YAML with dotted overrides, documented for --help.

Each component owns a small dataclass config beside its code (``GPTConfig`` in
``models/gpt.py``, ``TrainConfig`` in ``training/config.py`` ...); this module is the shared machinery:

- ``load_config(cls, yaml_path, overrides)`` builds a config from defaults, then a YAML file,
  then ``section.key=value`` overrides, in that order.
- Unknown keys are an error listing the valid ones (a typo never silently does nothing).
- Field docs are the attribute docstrings written under each field, read with ``ast`` so the
  dataclasses stay plain Python; ``describe_config`` turns them into ``--help`` text.
- ``__post_init__`` of each config validates values and raises ``ValueError`` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and how to fix it."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written right under it in the class body (and bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``key``."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: may not be null (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value else []
        if not isinstance(value, list | tuple):
            value = [value]
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def flat_section_of(cls: type, key: str) -> str | None:
    """The section of ``cls`` whose key ``key`` may be given without the section's name: a
    config lists such sections in ``FLAT_SECTIONS`` (a ClassVar), e.g. ``GenerateConfig``'s
    ``sampling``, so that ``temperature`` means ``sampling.temperature``."""
    for section in getattr(cls, "FLAT_SECTIONS", ()):
        inner, _ = _strip_optional(_hints(cls)[section])
        if key in {f.name for f in dataclasses.fields(inner)}:
            return section
    return None


def _unflatten(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of ``cls``'s flat sections moved into their section."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        section = None if key in names else flat_section_of(cls, key)
        out = _merge(out, {section: {key: value}} if section else {key: value})
    return out


def _apply(obj: Any, data: dict[str, Any], prefix: str, root: type | None = None) -> Any:
    """Return a copy of dataclass ``obj`` with ``data`` (a nested mapping) applied; ``root`` is
    the top config class (for suggestions)."""
    cls = type(obj)
    root = root or cls
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if getattr(cls, "FLAT_SECTIONS", ()):
        data = _unflatten(cls, data)
    changes: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed:
                raise ConfigError(f"config key {full!r} is now {prefix}{renamed}")
            raise ConfigError(
                f"unknown config key {full!r}{_did_you_mean(root, cls, key, value, prefix)}; "
                f"valid keys here: {', '.join(prefix + n for n in names)}"
            )
        tp = hints[key]
        inner, _ = _strip_optional(tp)
        if isinstance(value, dict) and not _is_config(inner) and typing.get_origin(inner) is not dict:
            (sub, subvalue), *_ = value.items()
            raise ConfigError(f"{full} is a value, not a section, so {full}.{sub} is no key"
                              f"{_did_you_mean(root, cls, sub, subvalue, prefix)}")
        if _is_config(inner):
            if value is None:
                changes[key] = None
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: is a section; give keys like {full}.<key>=<value>")
            current = getattr(obj, key)
            if current is None:
                current = inner()
            changes[key] = _apply(current, value, f"{full}.", root)
        else:
            changes[key] = coerce(value, tp, full)
    if not changes:
        return obj
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _did_you_mean(root: type, cls: type, key: str, value: Any, prefix: str) -> str:
    """``; did you mean label_column=x?`` for a key misspelt or put in the wrong section: a
    key of the same name elsewhere in the config, else the closest names here."""
    import difflib

    def shown(k: str) -> str:
        return f"{k}={value}" if not isinstance(value, dict) else f"{k}.<key>"

    leaves = [k for k, *_ in iter_fields(root)]
    same = [k for k in leaves if k.rsplit(".", 1)[-1] == key]
    if same:
        return f"; did you mean {' or '.join(shown(k) for k in same)}?"
    here = [prefix + f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(prefix + key, here, n=2, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(prefix + key, leaves, n=2, cutoff=0.75)
    return f"; did you mean {' or '.join(shown(k) for k in close)}?" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def require_at_least(cfg: Any, minimum: int, keys: typing.Iterable[str], prefix: str = "") -> None:
    """The bound check of config ``__post_init__`` methods: raise ValueError naming the first of
    ``keys`` (attributes of ``cfg``; ``prefix`` is the section, e.g. ``"loop."``) below ``minimum``."""
    for key in keys:
        value = getattr(cfg, key)
        if value < minimum:
            raise ValueError(f"{prefix}{key} must be >= {minimum}, got {value}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def load_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: T | None = None,
) -> T:
    """Build ``cls`` from defaults (or ``base``), a YAML file, then overrides (later wins)."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        data = load_yaml(yaml_path)
    if isinstance(overrides, dict):
        data = _merge(data, overrides)
    else:
        for text in overrides or []:
            path, value = parse_override(text)
            data = _merge(data, _nest(path, value))
    obj = base if base is not None else cls()
    return _apply(obj, data, "")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from ``to_dict`` output (e.g. a manifest's resolved config)."""
    return load_config(cls, overrides=data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe nested dict of a config (Paths become strings, tuples lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(tp))
    elif origin is not None:
        name = str(tp).replace("typing.", "").replace("pathlib.", "")
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} | None" if optional else name


def iter_fields(cls: type, prefix: str = "", defaults: Any = None) -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted key, type, default, doc) for every leaf field of a config class (a flat
    section's keys without the section's name; defaults as ``defaults``, else ``cls()``, has them)."""
    hints = _hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    flat = getattr(cls, "FLAT_SECTIONS", ())
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        if _is_config(inner):
            yield from iter_fields(inner, prefix if f.name in flat else f"{prefix}{f.name}.", getattr(defaults, f.name))
        else:
            yield f"{prefix}{f.name}", tp, getattr(defaults, f.name), docs.get(f.name, "")


def describe_config(cls: type, width: int = 100) -> str:
    """The ``--help`` listing: every key with its type, default and doc."""
    lines = []
    for key, tp, default, doc in iter_fields(cls):
        d = to_dict(default) if not isinstance(default, str | int | float | bool | type(None)) else default
        head = f"  {key}={d!r}  ({_type_name(tp)})"
        lines.append(head)
        if doc:
            lines.extend(textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
