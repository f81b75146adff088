"""How pilelm starts worker processes: how many, with which start method, and how they die.

One policy for every process pool (``pilelm prepare``'s local executor, ``pilelm tokenize``'s
encoders):

- **How many**: the number asked for, else one per core this process may run on
  (``os.sched_getaffinity``: a container or ``taskset`` limit counts, the machine's total does not).
- **Start method**: ``fork`` when the workers should inherit what the parent has loaded (a
  tokenizer) and no other non-daemon thread runs (forking beside a working thread can copy a
  lock it holds); otherwise ``forkserver``, whose server process imports ``preload`` once so
  each worker starts fast and clean (a parent whose native libraries started thread pools,
  pyarrow's for one, is never forked); ``spawn`` where neither exists.
- **Dying with the parent**: a worker blocks on its task queue forever if the parent is killed
  with SIGKILL (which it cannot catch to shut the pool down), so each worker asks Linux for
  SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``).
- **Started up front**: ``warm_up`` starts every worker before the parent starts threads of
  its own (progress bars), so a later fork never happens beside them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_count(requested: int = 0) -> int:
    """``requested``, or one per core this process may run on when it is 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def exit_with_parent(parent_pid: int | None) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux); exit now if
    the parent (``parent_pid``, when known) is already gone.

    A forkserver's worker is the server's child, and the server exits when the pool's owner
    does: the signal then arrives one step later.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def start_context(inherit: bool = False, preload: Sequence[str] = ()) -> BaseContext:
    """The multiprocessing context the policy above picks."""
    methods = multiprocessing.get_all_start_methods()
    if inherit and "fork" in methods:
        others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        if not others:
            return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker(parent_pid: int | None, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def _pid() -> int:
    return os.getpid()


def process_pool(workers: int, *, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 inherit: bool = False, preload: Sequence[str] = (), warm_up: bool = False) -> ProcessPoolExecutor:
    """A process pool of ``workers`` processes started by the policy above; ``inherit``: the
    workers should see the parent's loaded state (then forked when safe); ``preload``: modules
    the forkserver imports; ``warm_up``: start every worker before returning."""
    ctx = start_context(inherit, preload)
    parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else None
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(parent, initializer, initargs))
    if warm_up:
        for f in [pool.submit(_pid) for _ in range(workers)]:
            f.result()
    return pool

