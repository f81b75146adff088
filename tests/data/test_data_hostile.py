"""Hostile and mislabelled input files: decompression bombs stay bounded, deep nesting is a
rejection, and one bad file does not stop a prepare run."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard
from conftest import write_pile_shard

from pilelm.core.config import load_config
from pilelm.core.manifest import read_manifest
from pilelm.data.pipeline import PrepareConfig, run_prepare
from pilelm.data.readers import ReaderConfig, Rejected, iter_source, read_documents
from pilelm.data.sources import BadInputFile, estimate_size, expand_inputs

RLE_BLOCK = 128 << 10  # Block_Maximum_Size (RFC 8878 §3.1.1.2.3)


def zstd_rle_bomb(path: Path, blocks: int, byte: bytes = b"a") -> Path:
    """A valid zstd frame of ``blocks`` RLE blocks: 4 bytes each on disk, 128 KiB each out.

    Frame header (RFC 8878 §3.1.1.1): descriptor 0 (no content size, not single-segment, no
    checksum), window descriptor 0x38 (2^(10+7) = 128 KiB window). Block header: 3 bytes
    little-endian, last_block | block_type << 1 | block_size << 3, block_type 1 = RLE."""
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")
    for i in range(blocks):
        last = int(i == blocks - 1)
        out += (last | (1 << 1) | (RLE_BLOCK << 3)).to_bytes(3, "little") + byte
    path.write_bytes(bytes(out))
    return path


def read_all(path: Path, cfg: ReaderConfig | None = None) -> tuple[list, list[Rejected]]:
    docs, rejects = [], []
    for src in expand_inputs([str(path)]):
        for item in iter_source(src, cfg):
            (rejects if isinstance(item, Rejected) else docs).append(item)
    return docs, rejects


def test_the_crafted_frame_really_is_a_bomb(tmp_path):
    path = zstd_rle_bomb(tmp_path / "small.jsonl.zst", 3)
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        assert len(r.read()) == 3 * RLE_BLOCK  # 22 bytes on disk


def test_planning_and_reading_a_bomb_stay_bounded(tmp_path):
    """A 32 KiB file that decompresses to 1 GiB: planning estimates it without expanding it, and
    reading it ends in a named rejection; the peak memory of the process stays small."""
    path = zstd_rle_bomb(tmp_path / "bomb.jsonl.zst", 8192)
    assert path.stat().st_size < 33 << 10
    script = textwrap.dedent(f"""
        import json
        from pilelm.data.readers import Rejected, iter_source
        from pilelm.data.sources import estimate_size, expand_inputs

        def peak_mib():  # this process image's peak RSS (ru_maxrss would count the forked parent's)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        (src,) = expand_inputs([{str(path)!r}])
        size = estimate_size(src)
        items = list(iter_source(src))
        print(json.dumps({{"estimate": size, "rejects": [[r.reason, r.source] for r in items if isinstance(r, Rejected)],
                           "documents": sum(not isinstance(r, Rejected) for r in items),
                           "peak_mib": peak_mib()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["estimate"] <= path.stat().st_size * ReaderConfig().max_decompression_ratio
    assert result["documents"] == 0
    assert [r[0] for r in result["rejects"]] == ["decompression_bomb"]
    assert result["rejects"][0][1].startswith(str(path))
    assert result["peak_mib"] < 400  # expanding the file would take 1 GiB


def test_a_gzip_stream_is_capped_by_the_ratio_too(tmp_path):
    path = tmp_path / "zeros.jsonl.gz"
    path.write_bytes(gzip.compress(b"0" * (80 << 20), 1))  # about 200x
    docs, rejects = read_all(path, ReaderConfig(max_decompression_ratio=10))
    assert not docs and [r.reason for r in rejects] == ["decompression_bomb"]
    assert estimate_size(expand_inputs([str(path)])[0], max_ratio=10) <= path.stat().st_size * 10


def test_legitimate_compressed_files_are_not_bombs(tmp_path):
    recs = [{"text": "the same boilerplate line " * 40} for _ in range(5000)]  # very repetitive
    path = write_pile_shard(tmp_path / "rep.jsonl.zst", recs)
    docs, rejects = read_all(path)
    assert len(docs) == 5000 and not rejects


def test_deep_nesting_is_a_rejection_in_the_replace_path_too(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + b"[" * 200_000 + b"\xff\n" + b'{"text": "after"}\n')
    for mode in ("skip", "replace"):
        docs, rejects = read_all(path, ReaderConfig(on_bad_unicode=mode))
        assert [d.text for d in docs] == ["ok", "after"]
        assert [(r.reason, r.source.rsplit(":", 1)[1]) for r in rejects] == [
            ("invalid_utf8" if mode == "skip" else "invalid_json", "2")]


def test_jsonl_is_read_by_its_content_whatever_its_compression_suffix(tmp_path):
    recs = [{"text": f"doc {i}"} for i in range(3)]
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    (tmp_path / "gz.jsonl.zst").write_bytes(gzip.compress(payload))
    (tmp_path / "plain.jsonl.zst").write_bytes(payload)
    (tmp_path / "z.jsonl").write_bytes(zstandard.ZstdCompressor().compress(payload))
    (tmp_path / "z.jsonl.gz").write_bytes(zstandard.ZstdCompressor().compress(payload))
    for name, actual in [("gz.jsonl.zst", "gz"), ("plain.jsonl.zst", ""), ("z.jsonl", "zst"), ("z.jsonl.gz", "zst")]:
        (src,) = expand_inputs([str(tmp_path / name)])
        assert src.compression == actual and "read as" in src.note, name
        docs, rejects = read_all(tmp_path / name)
        assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2"] and not rejects, name


def test_a_file_that_cannot_be_read_as_named_is_an_error_or_a_named_skip(tmp_path):
    raw = tmp_path / "raw"
    write_pile_shard(raw / "good.jsonl.zst", [{"text": f"a good document number {i} with enough words"}
                                               for i in range(20)])
    (raw / "gz.jsonl.zst").write_bytes(gzip.compress(b'{"text": "gzip behind a zst name, read anyway"}\n'))
    (raw / "bad.parquet").write_bytes(b'{"text": "not parquet"}\n')
    zstd_rle_bomb(raw / "bomb.jsonl.zst", 2048)

    def cfg(out: str, on_bad_file: str) -> PrepareConfig:
        return load_config(PrepareConfig, overrides={
            "inputs": [str(raw)], "output": str(tmp_path / out), "reader": {"on_bad_file": on_bad_file},
            "filters": {"gopher_quality": []}, "dedup": {"exact": False, "minhash": False},
            "decontam": {"enabled": False}, "executor": {"workers": 1}})

    with pytest.raises(BadInputFile, match=r"bad\.parquet.*Parquet.*plain text"):
        run_prepare(cfg("strict", "error"))

    out = run_prepare(cfg("lenient", "skip"))
    m = read_manifest(out)
    assert [f["file"] for f in m["extra"]["skipped_files"]] == ["raw/bad.parquet"]
    assert "Parquet" in m["extra"]["skipped_files"][0]["reason"] and m["counts"]["files_skipped"] == 1
    assert [f["file"] for f in m["extra"]["read_by_content"]] == ["raw/gz.jsonl.zst"]
    assert m["counts"]["dropped"]["decompression_bomb"] == 1
    texts = [d.text for d in read_documents([out])]
    assert "gzip behind a zst name, read anyway" in texts and len(texts) == 21
    stats = (out / "stats.md").read_text()
    assert "raw/bad.parquet" in stats and "raw/gz.jsonl.zst" in stats
