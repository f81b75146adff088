"""The Jinja sandbox chat templates render in, with a time and a size limit.

A chat template is code that comes with a model (from the Hub, say), and Jinja's
``ImmutableSandboxedEnvironment`` keeps it from reaching Python's internals but not from
looping for hours (``{% for a in range(99999) %}{% for b in range(99999) %}``) or building a
string of gigabytes (``'x' * 10**10``, ``'x'|center(10**10)``, doubling a string in a loop).
``LimitedEnvironment`` adds, for the render in progress (``limits(...)`` sets them per thread):

- a deadline, checked at every line the template's compiled code runs (``sys.settrace`` on
  the rendering thread, for template code only: every loop iteration is seen), every ``range``
  step, call, intercepted operator and piece of output (one C-level operation, such as
  sorting a list of the size limit, runs to its end; the server also renders off its event
  loop and stops waiting at twice the deadline);
- a size limit: ``*``, ``**`` and ``+`` whose result would exceed it, and calls or filters
  given an integer above it (``center``, ``ljust``, ``format`` widths ...), are refused
  before they run, and the output stops at it.

Exceeding a limit raises ``TemplateLimitError`` (a ``jinja2.TemplateError``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jinja2
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment


class TemplateLimitError(jinja2.TemplateError):
    """A template ran past its time or size limit."""


_current = threading.local()  # .deadline (monotonic s) and .max_chars of this thread's render


@contextlib.contextmanager
def limits(timeout_s: float | None, max_chars: int | None) -> Iterator[None]:
    """Renders in this thread within ``timeout_s`` seconds and ``max_chars`` characters."""
    old = getattr(_current, "deadline", None), getattr(_current, "max_chars", None)
    _current.deadline = None if timeout_s is None else time.monotonic() + timeout_s
    _current.max_chars = max_chars
    try:
        yield
    finally:
        _current.deadline, _current.max_chars = old


def check_time() -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError("the chat template took longer than its time limit")


def check_size(n: int, what: str = "a value") -> None:
    limit = getattr(_current, "max_chars", None)
    if limit is not None and n > limit:
        raise TemplateLimitError(f"the chat template built {what} of {n} items; the limit is {limit}")


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool):
            check_size(abs(a), "an argument")


def _size(x: Any) -> int:
    return len(x) if isinstance(x, str | bytes | list | tuple) else 0


def _limited_range(*args: int) -> Iterator[int]:
    """Jinja's sandboxed ``range`` (at most ``MAX_RANGE`` items), checking the clock at each step."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise OverflowError(f"range of {len(rng)} items is too big (at most {MAX_RANGE})")
    for i in rng:
        check_time()
        yield i


def _limited(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        check_time()
        _check_args(args, kwargs)
        out = fn(*args, **kwargs)
        check_size(_size(out))
        return out

    return call


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` with the deadline and size limit of ``limits``."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.globals["range"] = _limited_range
        self.filters = {name: _limited(f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_time()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) and isinstance(times, int):
                    check_size(_size(seq) * times)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            check_size(abs(left).bit_length() * right // 4, "a number of that many digits")
        elif operator == "+":
            check_size(_size(left) + _size(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        check_time()
        _check_args(args, kwargs)
        out = super().call(__context, __obj, *args, **kwargs)
        check_size(_size(out))
        return out


def _trace_templates(frame: Any, event: str, arg: Any) -> Any:
    """A ``sys.settrace`` function that checks the clock at every line the template's compiled
    code runs (every loop iteration runs one), and nowhere else (Jinja compiles templates to
    Python code whose file name is ``<template>``)."""
    return _check_line if frame.f_code.co_filename == "<template>" else None


def _check_line(frame: Any, event: str, arg: Any) -> Any:
    check_time()  # raising here ends the template's frame with the error
    return _check_line


def render_limited(template: jinja2.Template, **variables: Any) -> str:
    """``template.render(**variables)``, piece by piece, stopping at the limits in force (with
    a deadline, the template's code runs traced: see ``_trace_templates``)."""
    out: list[str] = []
    n = 0
    traced = getattr(_current, "deadline", None) is not None
    previous = sys.gettrace()
    if traced:
        sys.settrace(_trace_templates)
    try:
        for piece in template.generate(**variables):
            n += len(piece)
            check_size(n, "an output")
            check_time()
            out.append(piece)
    finally:
        if traced:
            sys.settrace(previous)
    return "".join(out)
