"""Readers: formats, splits, field mapping, byte ranges, and every kind of bad input."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import write_pile_shard

from pilelm.data.document import Document
from pilelm.data.readers import ReaderConfig, Rejected, iter_lines, iter_source, read_documents
from pilelm.data.sources import check_zstd_frames, expand_inputs, split_of


def _docs(n: int, comp: str = "Pile-CC") -> list[dict]:
    return [{"text": f"document number {i} " * 3, "meta": {"pile_set_name": comp, "n": i}} for i in range(n)]


def _read_all(path: Path, cfg: ReaderConfig | None = None) -> tuple[list[Document], list[Rejected]]:
    docs, rejects = [], []
    for src in expand_inputs([str(path)], cfg.default_component if cfg else None):
        for item in iter_source(src, cfg):
            (rejects if isinstance(item, Rejected) else docs).append(item)
    return docs, rejects


def _jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_formats_give_the_same_documents(tmp_path: Path) -> None:
    recs = _docs(5)
    write_pile_shard(tmp_path / "zst" / "a.jsonl.zst", recs)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_bytes(_jsonl(recs))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(recs)))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "pq" / "a.parquet", row_group_size=2)
    want = [(r["text"], r["meta"]["n"]) for r in recs]
    for sub in ("zst", "plain", "gz", "pq"):
        docs, rejects = _read_all(tmp_path / sub)
        assert not rejects
        assert [(d.text, d.meta["n"]) for d in docs] == want, sub
        assert all(d.component == "Pile-CC" for d in docs)
        assert docs[2].id.endswith("a.jsonl.zst:3" if sub == "zst" else ":3")


def test_text_folder_glob_and_field_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second\r\nfile")
    (folder / "a.txt").write_text("first file")
    (folder / "sub" / "c.txt").write_text("third")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    docs = list(read_documents([folder]))
    assert [d.text for d in docs] == ["first file", "second\r\nfile", "third"]
    assert {d.component for d in docs} == {"notes"}
    assert docs[2].meta["source_file"] == "notes/sub/c.txt"
    # C4-style records: other field names, top-level fields move into meta
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-00.json.gz").write_bytes(
        gzip.compress(_jsonl([{"content": "hello", "url": "http://x", "src": "web", "uid": 7}])))
    cfg = ReaderConfig(text_field="content", component_field="src", id_field="uid")
    (doc,) = read_documents([str(tmp_path / "c4" / "*.json.gz")], cfg)
    assert (doc.id, doc.text, doc.component, doc.meta["url"]) == ("7", "hello", "web", "http://x")


def test_split_assignment() -> None:
    root = Path("/data/pile")
    assert split_of(root / "train" / "00.jsonl.zst", root) == "train"
    assert split_of(root / "val.jsonl.zst", root) == "val"
    assert split_of(root / "validation-00.jsonl", root) == "val"
    assert split_of(root / "test.jsonl.zst", root) == "test"
    assert split_of(root / "values.jsonl", root) == "train"  # val* but a different word
    assert split_of(root / "test" / "00.jsonl", root) == "test"
    assert split_of(Path("/tmp/test_foo0/data.jsonl"), None) == "train"  # pytest folder names
    assert split_of(Path("/x/val/data.jsonl"), None) == "val"


def test_byte_ranges_tile_the_file(tmp_path: Path) -> None:
    rng = random.Random(0)
    lines = [("x" * rng.randint(0, 300)).encode() for _ in range(300)]
    data = b"\n".join(lines) + b"\n"
    whole = [(ln.number, ln.data) for ln in iter_lines(io.BytesIO(data))]
    assert [d for _, d in whole] == lines
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 5))
        bounds = [0, *cuts, None]
        got = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            got += [(ln.number, ln.data) for ln in iter_lines(io.BytesIO(data), a, b)]
        assert got == whole


def test_zst_ranges_match_whole_file(tmp_path: Path) -> None:
    path = write_pile_shard(tmp_path / "a.jsonl.zst", _docs(200))
    (src,) = expand_inputs([str(path)])
    whole = [d.id for d in iter_source(src)]
    parts = [d.id for a, b in ((0, 5000), (5000, 9000), (9000, None)) for d in iter_source(src, None, a, b)]
    assert parts == whole and len(whole) == 200


# ---------------------------------------------------------------- bad input


def test_truncated_zst_keeps_complete_records_and_logs_the_cut(tmp_path: Path) -> None:
    rng = random.Random(1)
    recs = [{"text": " ".join(f"{rng.random():.6f}" for _ in range(60)), "meta": {"n": i}} for i in range(2000)]
    path = write_pile_shard(tmp_path / "a.jsonl.zst", recs)  # ~1 MB: several zstd blocks
    full = path.read_bytes()
    path.write_bytes(full[: len(full) * 2 // 3])
    assert "truncated" in check_zstd_frames(path)
    docs, rejects = _read_all(path)
    assert 0 < len(docs) < 2000
    assert [d.meta["n"] for d in docs] == list(range(len(docs)))
    assert [r.reason for r in rejects] == ["truncated_file"]
    assert rejects[0].source == f"{path}:{len(docs) + 1}"


def test_invalid_json_and_missing_or_wrong_text(tmp_path: Path) -> None:
    body = (b'{"text": "good one", "meta": {"pile_set_name": "A"}}\n'
            b'{"text": "broken\n'
            b'{"meta": {"pile_set_name": "A"}}\n'
            b'{"text": 42, "meta": {"pile_set_name": "A"}}\n'
            b'[1, 2]\n'
            b'\n'
            b'{"text": "good two", "meta": {"pile_set_name": "A"}}\n')
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    docs, rejects = _read_all(path)
    assert [d.text for d in docs] == ["good one", "good two"]
    assert [(r.reason, r.source) for r in rejects] == [
        ("invalid_json", f"{path}:2"), ("missing_text", f"{path}:3"),
        ("text_not_string", f"{path}:4"), ("not_an_object", f"{path}:5")]
    assert rejects[1].component == "A"


def test_invalid_utf8_and_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n{"text": "lone \\ud800 half"}\n')
    docs, rejects = _read_all(path)
    assert [d.text for d in docs] == ["ok"]
    assert [(r.reason, r.source.rsplit(":", 1)[1]) for r in rejects] == [("invalid_utf8", "2"), ("lone_surrogate", "3")]
    docs, rejects = _read_all(path, ReaderConfig(on_bad_unicode="replace"))
    assert not rejects
    assert [d.text for d in docs] == ["ok", "bad \ufffd\ufffd byte", "lone \ufffd half"]


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "e.jsonl.zst").write_bytes(b"")
    write_pile_shard(tmp_path / "nothing.jsonl.zst", [])
    docs, rejects = _read_all(tmp_path)
    assert docs == [] and rejects == []


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b\\r\\nc"}\r\n')
    docs, rejects = _read_all(path)
    assert not rejects and [d.text for d in docs] == ["a", "b\r\nc"]


def test_content_that_contradicts_the_extension_is_a_clear_error(tmp_path: Path) -> None:
    # JSON lines are read by their content (tests/data/test_data_hostile.py); other formats are checked.
    (tmp_path / "plain.parquet").write_bytes(b'{"text": "not parquet"}\n')
    with pytest.raises(ValueError, match=r"plain\.parquet.*Parquet.*plain text"):
        expand_inputs([str(tmp_path / "plain.parquet")])
    (tmp_path / "z.txt").write_bytes(zstandard.ZstdCompressor().compress(b"some text"))
    with pytest.raises(ValueError, match=r"z\.txt.*content is zstd"):
        expand_inputs([str(tmp_path / "z.txt")])
    with pytest.raises(ValueError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])


def test_huge_single_line_is_read_or_skipped_with_bounded_memory(tmp_path: Path) -> None:
    text = "word " * 10_000_000  # a 50 MB line
    path = write_pile_shard(tmp_path / "big.jsonl.zst", [{"text": "small"}, {"text": text}, {"text": "after"}])
    docs, rejects = _read_all(path)
    assert [len(d.text) for d in docs] == [5, len(text), 5] and not rejects
    docs, rejects = _read_all(path, ReaderConfig(max_line_bytes=1 << 20))
    assert [d.text for d in docs] == ["small", "after"]
    assert [(r.reason, r.source.rsplit(":", 1)[1]) for r in rejects] == [("line_too_long", "2")]
    assert rejects[0].nbytes > 50_000_000


def test_hugging_face_dataset_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split, streaming):  # the network is not available in tests
        calls.append((name, config, split, streaming))
        return iter([{"text": "first", "title": "A"}, {"text": 3}, {"text": "second", "title": "B"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (src,) = expand_inputs(["hf:org/wiki#20220301.en@validation"])
    assert (src.split, src.component) == ("val", "wiki")
    items = list(iter_source(src))
    assert calls == [("org/wiki", "20220301.en", "validation", True)]
    assert [(d.text, d.meta["title"]) for d in items if isinstance(d, Document)] == [("first", "A"), ("second", "B")]
    assert [(r.reason, r.source) for r in items if isinstance(r, Rejected)] == [
        ("text_not_string", "hf:org/wiki#20220301.en@validation:2")]


def test_parquet_row_group_ranges(tmp_path: Path) -> None:
    recs = _docs(10)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet", row_group_size=3)
    (src,) = expand_inputs([str(tmp_path / "a.parquet")])
    parts = [d for a, b in ((0, 2), (2, None)) for d in iter_source(src, None, a, b)]
    assert [d.meta["n"] for d in parts] == list(range(10))
    assert parts[7].id.endswith("a.parquet:8")
