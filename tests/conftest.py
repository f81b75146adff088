"""Shared fixtures. Tests are offline and deterministic; torch uses the machine's 2 cores."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
MINIPILE = ROOT.parent / "shared" / "minipile"


def write_pile_shard(path: Path, docs: list[dict]) -> Path:
    """Write records as a streaming-compressed .jsonl.zst (no content size in the frame, like the Pile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as w:
        for d in docs:
            w.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return path


def read_pile_shard(path: Path) -> list[dict]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        return [json.loads(line) for line in io.TextIOWrapper(r, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="session")
def minipile() -> Path:
    """The shared real corpus in the Pile layout (../shared/minipile)."""
    if not (MINIPILE / "val.jsonl.zst").is_file():
        pytest.skip("../shared/minipile is not present")
    return MINIPILE
