"""Content hashes of files and folders: what a manifest records about each input.

Stage directories are hashed by their manifest (see ``pilelm.core.manifest.content_hash``);
everything else by its bytes, here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files up to this size are hashed whole. A Pile train shard is ~14 GB compressed (30 of them):
# hashing each in full would add minutes of single-core SHA-256 to every stage that lists them.
FULL_HASH_LIMIT = 256 << 20
SAMPLE_BLOCK = 4 << 20


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sampled_sha256(path: str | Path, block: int | None = None) -> str:
    """SHA-256 of a big file's size and 4 MiB blocks at its start, middle and end: catches a
    truncated, regrown or replaced shard without reading all of it."""
    block = SAMPLE_BLOCK if block is None else block
    size = Path(path).stat().st_size
    h = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        for offset in (0, max(0, size // 2 - block // 2), max(0, size - block)):
            f.seek(offset)
            h.update(f.read(block))
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """A file's hash, tagged with how it was taken: whole up to ``FULL_HASH_LIMIT``, sampled above."""
    if Path(path).stat().st_size > FULL_HASH_LIMIT:
        return "sampled-sha256:" + sampled_sha256(path)
    return "sha256:" + file_sha256(path)


def tree_hash(folder: str | Path) -> str:
    """A folder's hash: SHA-256 of the sorted (relative path, ``file_hash``) of its files."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + file_hash(p).encode())
    return "tree:" + h.hexdigest()
