"""Stage output directories: ``manifest.json``, content hashes and atomic writes.

Every stage writes one directory holding its artefacts and a ``manifest.json`` with the stage
name, package version, resolved config, inputs (paths + content hashes), counts and timings.
The manifest is written last, atomically: a directory with a manifest is a finished stage
output; one without is unfinished and is never read as input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilelm import __version__
from pilelm.core.config import to_dict

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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place (atomic on POSIX).

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files up to this size are hashed whole. A Pile train shard is ~14 GB compressed (30 of them):
# hashing each in full would add minutes of single-core SHA-256 to every stage that lists them.
FULL_HASH_LIMIT = 256 << 20
SAMPLE_BLOCK = 4 << 20


def sampled_sha256(path: str | Path, block: int = SAMPLE_BLOCK) -> str:
    """SHA-256 of a big file's size and 4 MiB blocks at its start, middle and end: catches a
    truncated, regrown or replaced shard without reading all of it."""
    size = Path(path).stat().st_size
    h = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        for offset in (0, max(0, size // 2 - block // 2), max(0, size - block)):
            f.seek(offset)
            h.update(f.read(block))
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """A content hash of an input: a stage directory is identified by its manifest's hash,
    a file by its bytes (sampled above ``FULL_HASH_LIMIT``), a plain folder by the sorted
    (relative path, hash) of its files."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "manifest:" + file_sha256(path / MANIFEST)
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0" + content_hash(p).encode())
        return "tree:" + h.hexdigest()
    if path.stat().st_size > FULL_HASH_LIMIT:
        return "sampled-sha256:" + sampled_sha256(path)
    return "sha256:" + file_sha256(path)


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
