"""Executors run a stage's tasks: locally on a process pool, or on a Ray cluster.

A task is a picklable callable applied to one task description; it writes its outputs
atomically and a completion marker last. The pipeline only submits tasks without a marker,
so a killed run (kill -9 included) resumes where it stopped, and because every task's
output depends only on its inputs, the final output is the same byte for byte.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tqdm import tqdm

from pilelm.core.workers import process_pool, worker_count

log = logging.getLogger(__name__)

# What every worker imports: the task functions of `pilelm prepare` and what they use.
PRELOAD = ("pilelm.data.prepare_tasks",)


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    """`local`: a process pool on this machine; `ray`: tasks on a Ray cluster (`pip install
    pilelm[ray]`; the output folder must be on storage every node can reach)."""
    workers: int = 0
    """Processes for the local executor; 0: one per CPU core this process may use."""
    task_bytes: int = 512 << 20
    """Files larger than this (decompressed, estimated for .zst/.gz) are split into byte
    ranges of about this size, each a task."""
    group_bytes: int = 16 << 20
    """Consecutive files smaller than this are grouped into one task of up to this size."""
    ray_address: str | None = None
    """Ray cluster address (e.g. `ray://head:10001` or `auto`); None: the running Ray
    session, else a new local one."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError("executor.workers must be >= 0 (0 = one per core)")
        if self.task_bytes < 1 << 16:
            raise ValueError("executor.task_bytes must be >= 65536")
        if self.group_bytes < 0:
            raise ValueError("executor.group_bytes must be >= 0")
        if self.kind not in ("local", "ray"):
            raise ValueError("executor.kind must be local or ray")

    def n_workers(self) -> int:
        return worker_count(self.workers)


def _call(fn: Callable[[Any], Any], task: Any) -> Any:
    return fn(task)


class LocalExecutor:
    """Runs tasks on a pool of worker processes (in this process when workers == 1)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # Workers start from a clean process that preloaded the data steps (see
            # pilelm.core.workers), never as forks of this one: they inherit nothing from it.
            self._pool = process_pool(self.workers, preload=PRELOAD)
        return self._pool

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], desc: str) -> None:
        if not tasks:
            return
        bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=None, leave=False)
        try:
            if self.workers <= 1 or len(tasks) == 1:
                for t in tasks:
                    fn(t)
                    bar.update()
                return
            pool = self._get_pool()
            futures = [pool.submit(_call, fn, t) for t in tasks]
            try:
                for fut in cf.as_completed(futures):
                    fut.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        finally:
            bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Runs each task as a Ray remote function (one CPU each); Ray is imported only here."""

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError as e:
            raise ValueError("executor.kind=ray needs Ray: pip install 'pilelm[ray]'") from e
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        self._remote = ray.remote(num_cpus=1, max_retries=2)(_call)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], desc: str) -> None:
        if not tasks:
            return
        ray = self._ray
        fn_ref = ray.put(fn)
        pending = [self._remote.remote(fn_ref, t) for t in tasks]
        with tqdm(total=len(tasks), desc=desc, unit="task", disable=None, leave=False) as bar:
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
                    bar.update(len(done))
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(cfg: ExecutorConfig) -> LocalExecutor | RayExecutor:
    if cfg.kind == "ray":
        return RayExecutor(cfg.ray_address)
    return LocalExecutor(cfg.n_workers())
