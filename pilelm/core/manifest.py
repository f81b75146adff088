"""Stage output directories: ``manifest.json``, what each records and checks.

Every stage writes one directory holding its artefacts and a ``manifest.json`` with the stage
name, package version, resolved config, inputs (paths + content hashes), counts and timings.
The manifest is written last, atomically: a directory with a manifest is a finished stage
output; one without is unfinished and is never read as input.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilelm import __version__
from pilelm.core.atomic import atomic_write_json
from pilelm.core.config import to_dict
from pilelm.core.hashing import file_hash, file_sha256, tree_hash

MANIFEST = "manifest.json"

# What each stage reads, and the command that makes it: used in "run X first" errors.
PRODUCER_HINT = {
    "prepare": "pilelm prepare RAW_FILES... -o PREPARED_DIR",
    "tokenizer": "pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR",
    "tokenize": "pilelm tokenize PREPARED_DIR --tokenizer TOKENIZER_DIR -o SHARD_DIR",
    "train": "pilelm train --data SHARD_DIR -o RUN_DIR",
    "import": "pilelm import HF_DIR -o RUN_DIR",
    "eval": "pilelm eval RUN_DIR --data SHARD_DIR",
}


class StageInputError(FileNotFoundError):
    """An input directory is missing, unfinished or made by the wrong stage."""


def content_hash(path: str | Path) -> str:
    """A content hash of an input: a stage directory is identified by its manifest's hash,
    a file by its bytes (sampled above ``FULL_HASH_LIMIT``), a plain folder by the sorted
    (relative path, hash) of its files."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "manifest:" + file_sha256(path / MANIFEST)
        return tree_hash(path)
    return file_hash(path)


@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    inputs: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = ""
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "created": self.created,
            "host": self.host,
            "config": self.config,
            "inputs": self.inputs,
            "counts": self.counts,
            "timings": self.timings,
            **({"extra": self.extra} if self.extra else {}),
        }


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: Any,
    inputs: list[str | Path] | None = None,
    counts: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``out_dir/manifest.json`` atomically; call it last, when the artefacts are done."""
    out_dir = Path(out_dir)
    m = Manifest(
        stage=stage,
        config=config if isinstance(config, dict) else to_dict(config),
        inputs=[{"path": str(p), "hash": content_hash(p)} for p in (inputs or [])],
        counts=dict(counts or {}),
        timings={k: round(float(v), 3) for k, v in (timings or {}).items()},
        extra=dict(extra or {}),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=platform.node(),
    )
    atomic_write_json(out_dir / MANIFEST, m.to_json())
    return m


def clear_manifest(out_dir: str | Path) -> None:
    """Remove ``out_dir``'s manifest before a stage rewrites its artefacts there: until the new
    manifest lands the directory reads as unfinished, so a run that dies mid-rewrite never
    leaves an old manifest vouching for new (or half-written) files."""
    (Path(out_dir) / MANIFEST).unlink(missing_ok=True)


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    with open(path) as f:
        return json.load(f)


def require_stage(stage_dir: str | Path, *stages: str, what: str = "input") -> dict[str, Any]:
    """Return the manifest of ``stage_dir`` if one of ``stages`` made it, else raise an error
    that says which command to run first."""
    stage_dir = Path(stage_dir)
    hint = " or ".join(f"`{PRODUCER_HINT.get(s, 'pilelm ' + s)}`" for s in stages)
    if not stage_dir.exists():
        raise StageInputError(f"{what} directory {stage_dir} does not exist; run {hint} first")
    if not stage_dir.is_dir():
        raise StageInputError(f"{what} {stage_dir} is a file, not a stage directory; run {hint} first")
    if not (stage_dir / MANIFEST).is_file():
        raise StageInputError(
            f"{what} directory {stage_dir} has no {MANIFEST}: it is not a finished stage output; "
            f"run (or finish) {hint} first"
        )
    try:
        manifest = read_manifest(stage_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise StageInputError(f"{stage_dir / MANIFEST} cannot be read ({e}); rerun {hint}") from e
    if manifest.get("stage") not in stages:
        raise StageInputError(
            f"{what} directory {stage_dir} was made by `pilelm {manifest.get('stage')}`, but this "
            f"step needs the output of {' or '.join(stages)}; run {hint} first"
        )
    return manifest


class Timer:
    """Collects wall-clock timings by name: ``with timer("encode"): ...``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
