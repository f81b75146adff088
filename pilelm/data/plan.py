"""The plan of a ``pilelm prepare`` run: its tasks, and where each one keeps its work.

A task is a list of pieces (a file, a byte range of a big file, or several small files) of
one split. The plan depends only on the inputs and the config, never on the number of
workers, so a resumed run (or one on a Ray cluster) does the same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pilelm.data.config import PrepareConfig
from pilelm.data.executor import ExecutorConfig
from pilelm.data.prepared import SPLITS, WORK
from pilelm.data.sources import SourceFile, plan_ranges


@dataclass(frozen=True)
class Piece:
    source: int
    """Index into the run's sources."""
    start: int = 0
    end: int | None = None
    """Decompressed byte range (JSON lines) or row-group range (Parquet); None = to the end."""


@dataclass(frozen=True)
class Task:
    split: str
    index: int
    pieces: tuple[Piece, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def plan_tasks(sources: list[SourceFile], cfg: ExecutorConfig) -> list[Task]:
    """Split big files into ranges and group small consecutive files, per split; the plan
    depends only on the inputs and the config, never on the number of workers."""
    tasks: list[Task] = []
    for split in SPLITS:
        groups: list[list[Piece]] = []
        group: list[Piece] = []
        group_size = 0
        for i, src in enumerate(sources):
            if src.split != split:
                continue
            ranges = plan_ranges(src, cfg.task_bytes)
            size = ranges[0][2]
            if len(ranges) == 1 and size < cfg.group_bytes:
                if group and group_size + size > cfg.group_bytes:
                    groups.append(group)
                    group, group_size = [], 0
                group.append(Piece(i))
                group_size += size
                continue
            if group:
                groups.append(group)
                group, group_size = [], 0
            groups.extend([Piece(i, a, b)] for a, b, _ in ranges)
        if group:
            groups.append(group)
        tasks.extend(Task(split, k, tuple(g)) for k, g in enumerate(groups))
    return tasks


@dataclass
class PrepareJob:
    """Everything a task needs (pickled to workers)."""

    cfg: PrepareConfig
    sources: list[SourceFile]
    out: Path
    tasks: list[Task]

    @property
    def work(self) -> Path:
        return self.out / WORK

    def clean_path(self, task: Task, kind: str) -> Path:
        return self.work / "clean" / f"{task.name}.{kind}"

    def split_tasks(self, split: str) -> list[Task]:
        return [t for t in self.tasks if t.split == split]
