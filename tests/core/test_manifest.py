"""Stage output directories: atomic writes, manifests, content hashes, `run X first` errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilelm.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from pilelm.core.manifest import (
    MANIFEST,
    StageInputError,
    Timer,
    content_hash,
    read_manifest,
    require_stage,
    write_manifest,
)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_text(target, '{"x": 2}')
    assert json.loads(target.read_text()) == {"x": 2}
    assert _leftovers(target.parent) == []


def test_failed_atomic_write_keeps_old_file_and_no_tmp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert not (tmp_path / "new.bin").exists() and _leftovers(tmp_path) == []


def test_timer_accumulates_by_name():
    timer = Timer()
    for _ in range(2):
        with timer("encode"):
            pass
    with pytest.raises(ValueError), timer("fail"):
        raise ValueError
    assert set(timer.timings) == {"encode", "fail"} and all(t >= 0 for t in timer.timings.values())


@dataclass
class _Cfg:
    output: Path = Path("out")
    vocab_size: int = 512


def test_write_manifest_records_config_inputs_counts(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("hello")
    m = write_manifest(tmp_path / "stage", "tokenize", _Cfg(), inputs=[raw], counts={"train": {"documents": 3}},
                       timings={"encode": 0.12345})
    got = read_manifest(tmp_path / "stage")
    assert got["stage"] == "tokenize" and got["config"] == {"output": "out", "vocab_size": 512}
    assert got["inputs"] == [{"path": str(raw), "hash": content_hash(raw)}]
    assert got["counts"]["train"]["documents"] == 3 and got["timings"]["encode"] == 0.123
    assert got["version"] == m.version and got["created"]
    assert _leftovers(tmp_path / "stage") == []


def test_content_hash_of_files_folders_and_stage_dirs(tmp_path):
    f = tmp_path / "d" / "a.txt"
    f.parent.mkdir()
    f.write_text("a")
    h_file, h_dir = content_hash(f), content_hash(f.parent)
    assert h_file.startswith("sha256:") and h_dir.startswith("tree:")
    f.write_text("b")
    assert content_hash(f) != h_file and content_hash(f.parent) != h_dir
    write_manifest(f.parent, "prepare", {})
    assert content_hash(f.parent).startswith("manifest:")


def test_require_stage_says_what_to_run_first(tmp_path):
    with pytest.raises(StageInputError, match=r"does not exist; run `pilelm prepare .*` first"):
        require_stage(tmp_path / "missing", "prepare")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StageInputError, match="is a file"):
        require_stage(tmp_path / "file", "tokenize")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(StageInputError, match=rf"no {MANIFEST}.*pilelm tokenize PREPARED_DIR"):
        require_stage(unfinished, "tokenize")
    write_manifest(tmp_path / "prep", "prepare", {})
    with pytest.raises(StageInputError, match=r"made by `pilelm prepare`.*needs the output of train or import"):
        require_stage(tmp_path / "prep", "train", "import")
    assert require_stage(tmp_path / "prep", "prepare")["stage"] == "prepare"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(StageInputError, match="cannot be read"):
        require_stage(tmp_path / "bad", "prepare")


def test_big_files_get_a_sampled_hash_that_sees_truncation(tmp_path, monkeypatch):
    import pilelm.core.hashing as hashing
    import pilelm.core.manifest as manifest

    monkeypatch.setattr(hashing, "FULL_HASH_LIMIT", 1000)
    monkeypatch.setattr(hashing, "SAMPLE_BLOCK", 64)
    p = tmp_path / "big.bin"
    p.write_bytes(bytes(range(256)) * 20)
    h = manifest.content_hash(p)
    assert h.startswith("sampled-sha256:")
    assert manifest.content_hash(p) == h
    p.write_bytes(bytes(range(256)) * 19)
    assert manifest.content_hash(p) != h
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 10)
    assert manifest.content_hash(small).startswith("sha256:")
