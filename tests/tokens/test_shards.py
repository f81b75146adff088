"""MMIDIDX shards, the tokenize stage and others' formats (pilelm.tokens.mmidx, shards, tokenize, formats, exchange)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_pile_shard, write_pile_shard

from pilelm.core.config import ConfigError, load_config
from pilelm.core.manifest import StageInputError, read_manifest, write_manifest
from pilelm.tokens.exchange import export_split
from pilelm.tokens.fast_bpe import tokenizer_from_ranks
from pilelm.tokens.formats.lmdb import export_lmdb, read_lmdb
from pilelm.tokens.formats.nanogpt import export_nanogpt, nanogpt_to_indexed, read_nanogpt, split_documents
from pilelm.tokens.formats.pythia import open_pythia
from pilelm.tokens.formats.tfrecord import (
    crc32c,
    export_tfrecord,
    parse_tf_example,
    read_tfrecord,
    tf_example,
)
from pilelm.tokens.mmidx import IndexedDataset, IndexedDatasetWriter, token_dtype, write_indexed_dataset
from pilelm.tokens.shards import open_split
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize
from pilelm.tokens.tokenizer import PileTokenizer, load_tokenizer
from pilelm.tokens.tokenizer_train import TokenizerTrainConfig, run_tokenizer_train

SAMPLE = ROOT / "pilelm" / "sample"


def _docs(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(1, 40))) for _ in range(n)]


def _write_mmidx_by_hand(prefix: Path, docs: list[np.ndarray], code: int, np_dtype: str) -> None:
    """An independent MMIDIDX writer following the published layout (Megatron-LM
    indexed_dataset.py / GPT-NeoX): header, sizes int32, pointers int64, doc_idx int64."""
    with open(prefix.with_suffix(".bin"), "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=np_dtype).tobytes())
    itemsize = np.dtype(np_dtype).itemsize
    sizes = [len(d) for d in docs]
    pointers, p = [], 0
    for s in sizes:
        pointers.append(p)
        p += s * itemsize
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(sizes) + 1))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(sizes)}q", *pointers))
        f.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))


def test_writer_output_is_the_published_layout(tmp_path):
    docs = _docs(50, 1000)
    write_indexed_dataset(tmp_path / "ours", docs, np.uint16)
    _write_mmidx_by_hand(tmp_path / "ref", docs, 8, "<u2")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "ours")
    assert len(ds) == 50 and ds.dtype == np.uint16 and ds.num_documents == 50
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))
    assert np.array_equal(ds[-1], docs[-1]) and np.array_equal(ds.get(3, 1, 2), docs[3][1:3])
    assert ds.num_tokens == sum(map(len, docs)) == len(ds.tokens)
    assert not list(tmp_path.glob(".*partial"))  # spill files are gone
    with pytest.raises(IndexError):
        ds[50]


def test_pythia_reader_on_independently_written_files(tmp_path):
    # Pythia: uint16 (code 8), GPT-NeoX-20B ids (< 50304), <|endoftext|> = 0 after each document.
    docs = [np.append(d, 0) for d in _docs(30, 50304, seed=1)]
    prefix = tmp_path / "pile_0.87_deduped_text_document"
    _write_mmidx_by_hand(prefix, docs, 8, "<u2")
    ds = open_pythia(prefix.with_suffix(".bin"))
    assert ds.dtype == np.uint16 and len(ds) == 30
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))
    assert np.array_equal(ds.document(4), docs[4]) and ds[7][-1] == 0
    # A doc_idx that groups sequences into documents (Megatron's --split-sentences).
    idx = bytearray(prefix.with_suffix(".idx").read_bytes())
    head = 9 + 8 + 1
    struct.pack_into("<Q", idx, head + 8, 3)  # three doc_idx entries: documents [0, 3) and [3, 30)
    idx = idx[: head + 16 + 12 * 30] + struct.pack("<3q", 0, 3, 30)
    (tmp_path / "grouped.idx").write_bytes(bytes(idx))
    (tmp_path / "grouped.bin").write_bytes(prefix.with_suffix(".bin").read_bytes())
    g = IndexedDataset(tmp_path / "grouped")
    assert g.num_documents == 2 and np.array_equal(g.document(0), np.concatenate(docs[:3]))
    # Sharded downloads must be joined first; the error says how.
    (tmp_path / "document-00000-of-00002.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="cat "):
        open_pythia(tmp_path / "document")


def test_bad_index_files_are_named(tmp_path):
    write_indexed_dataset(tmp_path / "d", _docs(5, 100), np.uint16)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(b"NOTMMIDX\x00" + raw[9:])
    with pytest.raises(ValueError, match=r"d\.idx: not an MMIDIDX"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(raw)
    (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"d\.bin: .* truncated"):
        IndexedDataset(tmp_path / "d")


def test_dtype_choice_and_uint16_overflow_guard(tmp_path):
    assert token_dtype(50304) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.int32 and token_dtype(200_019) == np.int32
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(ValueError, match="does not fit uint16"):
        w.add_document(np.array([1, 70_000], dtype=np.int64))
    w.abort()
    big = [np.array([65_535, 65_536, 100_000, 0])]
    write_indexed_dataset(tmp_path / "y", big, np.int32)
    ds = IndexedDataset(tmp_path / "y")
    assert ds.dtype == np.int32 and ds[0].tolist() == [65_535, 65_536, 100_000, 0]


def test_nanogpt_roundtrip(tmp_path):
    eot = 50256
    docs = [np.append(d, eot) for d in _docs(40, 50000, seed=2)]
    write_indexed_dataset(tmp_path / "s", docs, np.uint16)
    ds = IndexedDataset(tmp_path / "s")
    export_nanogpt(ds, tmp_path / "train.bin")
    flat = read_nanogpt(tmp_path / "train.bin")
    assert (tmp_path / "train.bin").stat().st_size == 2 * len(flat)  # flat uint16, no header
    assert np.array_equal(flat, np.concatenate(docs))
    assert [d.tolist() for d in split_documents(flat, eot)] == [d.tolist() for d in docs]
    # Back to MMIDIDX, with chunks smaller than documents (documents span chunks).
    back = IndexedDataset(nanogpt_to_indexed(tmp_path / "train.bin", tmp_path / "back", eod_id=eot, chunk=7))
    assert len(back) == len(docs) and all(np.array_equal(back[i], d) for i, d in enumerate(docs))
    with pytest.raises(ValueError, match="whole number"):
        (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
        read_nanogpt(tmp_path / "odd.bin")


def test_lmdb_roundtrip(tmp_path):
    docs = _docs(25, 70_000, seed=3)
    write_indexed_dataset(tmp_path / "s", docs, np.int32)
    comp = np.arange(25, dtype=np.int16) % 3
    export_lmdb(IndexedDataset(tmp_path / "s"), tmp_path / "db", {"eod_id": 0}, component=comp)
    meta, it = read_lmdb(tmp_path / "db")
    assert meta["documents"] == 25 and meta["dtype"] == "int32" and meta["eod_id"] == 0
    assert [d.tolist() for d in it] == [d.tolist() for d in docs]
    import lmdb

    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == 25 + 2  # one record per document + meta + components
        assert np.array_equal(np.frombuffer(txn.get(b"__component__"), "<i2"), comp)
    env.close()
    with pytest.raises(FileExistsError):
        export_lmdb(IndexedDataset(tmp_path / "s"), tmp_path / "db")


def _example_class():
    """tf.train.Example built from its published .proto definitions with protobuf's
    descriptor API (no TensorFlow): an independent parser for our hand-written bytes."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="example_test.proto", package="tftest", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    i64 = fdp.message_type.add(name="Int64List")
    i64.field.add(name="value", number=1, type=F.TYPE_INT64, label=F.LABEL_REPEATED,
                  options=descriptor_pb2.FieldOptions(packed=True))
    feat = fdp.message_type.add(name="Feature")
    feat.field.add(name="int64_list", number=3, type=F.TYPE_MESSAGE, type_name=".tftest.Int64List",
                   label=F.LABEL_OPTIONAL)
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry", options=descriptor_pb2.MessageOptions(map_entry=True))
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, type_name=".tftest.Feature", label=F.LABEL_OPTIONAL)
    feats.field.add(name="feature", number=1, type=F.TYPE_MESSAGE, type_name=".tftest.Features.FeatureEntry",
                    label=F.LABEL_REPEATED)
    ex = fdp.message_type.add(name="Example")
    ex.field.add(name="features", number=1, type=F.TYPE_MESSAGE, type_name=".tftest.Features", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Example"))


def test_tfrecord_roundtrip_with_crc(tmp_path):
    # CRC-32C check value from RFC 3720 / the CRC catalogue: crc32c("123456789") = 0xE3069283.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0 and crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 zero bytes
    docs = _docs(20, 300_000, seed=4) + [np.array([0, 127, 128, 16383, 16384, 2**31 - 1])]
    write_indexed_dataset(tmp_path / "s", docs, np.int32)
    comp = np.arange(len(docs)) % 4
    export_tfrecord(IndexedDataset(tmp_path / "s"), tmp_path / "d.tfrecord", component=comp)
    records = list(read_tfrecord(tmp_path / "d.tfrecord"))
    assert len(records) == len(docs)
    Example = _example_class()
    for rec, doc, c in zip(records, docs, comp, strict=True):
        ours = parse_tf_example(rec)
        assert ours["input_ids"].tolist() == doc.tolist() and ours["component"].tolist() == [c]
        ex = Example.FromString(rec)
        assert list(ex.features.feature["input_ids"].int64_list.value) == doc.tolist()
        assert list(ex.features.feature["component"].int64_list.value) == [c]
    # protobuf's own serialization of the same message is byte-identical to ours.
    ref = Example()
    ref.features.feature["input_ids"].int64_list.value.extend([1, 300, 70_000])
    assert tf_example({"input_ids": np.array([1, 300, 70_000])}) == ref.SerializeToString()
    # A flipped byte fails the CRC.
    raw = bytearray((tmp_path / "d.tfrecord").read_bytes())
    raw[20] ^= 0x01
    (tmp_path / "bad.tfrecord").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC mismatch"):
        list(read_tfrecord(tmp_path / "bad.tfrecord"))


# ---------------------------------------------------------------- the tokenize stage


def _prepared(root: Path, files: dict[str, list[dict]]) -> Path:
    for rel, docs in files.items():
        write_pile_shard(root / rel, docs)
    write_manifest(root, "prepare", {"source": "tests"})
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared dir (slices of the bundled sample, three splits, one bad line) and a tiny BPE."""
    root = tmp_path_factory.mktemp("shards")
    train = read_pile_shard(SAMPLE / "train" / "01.jsonl.zst")[:90]
    docs = {
        "train/00.jsonl.zst": [{"text": d["text"][:3000], "meta": d["meta"]} for d in train[:45]],
        "train/01.jsonl.zst": [{"text": d["text"][:3000], "meta": d["meta"]} for d in train[45:]]
                              + [{"text": "", "meta": {"pile_set_name": "Empty"}}],
        "val/val.jsonl.zst": read_pile_shard(SAMPLE / "val.jsonl.zst")[:20],
        "test/test.jsonl.zst": read_pile_shard(SAMPLE / "test.jsonl.zst")[:10],
    }
    prep = _prepared(root / "prep", docs)
    raw = (prep / "train" / "00.jsonl.zst")
    # Append a broken line to the first file: a counted skip, not a crash.
    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(raw.read_bytes()).read()
    raw.write_bytes(zstandard.ZstdCompressor().compress(
        data + b'{"text": broken\n{"meta": {}}\n{"text": "lone \\ud800 surrogate"}\n'))
    tok = run_tokenizer_train(TokenizerTrainConfig(data=prep, output=root / "tok", vocab_size=400))
    return prep, tok


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    prep, tok = corpus
    return run_tokenize(TokenizeConfig(data=prep, tokenizer=tok, output=tmp_path_factory.mktemp("s") / "shards",
                                       workers=1, batch_bytes=20_000))


def test_shard_dir_contract(corpus, shards):
    prep, tok_dir = corpus
    tok = load_tokenizer(tok_dir)
    m = read_manifest(shards)
    assert m["stage"] == "tokenize" and set(m["counts"]["splits"]) == {"train", "val", "test"}
    assert m["extra"]["tokenizer"]["eod_id"] == tok.eod_id == 0
    assert (shards / "tokenizer" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert not (shards / ".partial").exists()
    for split in ("train", "val", "test"):
        records = [r for p in sorted((prep / split).glob("*.zst")) for r in _good_records(p)]
        ts = open_split(shards, split)
        assert len(ts) == len(records) == m["counts"]["splits"][split]["documents"]
        assert ts.dataset.dtype == np.uint16 and ts.eod_id == 0 and ts.vocab_size == 400
        assert ts.tokenizer_dir == shards / "tokenizer"
        for i, r in enumerate(records):
            doc = ts.dataset[i]
            assert doc[-1] == 0 and doc[:-1].tolist() == tok.hf.encode(r["text"]).ids  # one EOD per document
            assert ts.component_names[ts.component[i]] == r["meta"]["pile_set_name"]
            assert ts.nbytes[i] == len(r["text"].encode("utf-8"))
        assert ts.dataset.num_tokens == m["counts"]["splits"][split]["tokens"]
        assert json.loads((shards / f"{split}.components.json").read_text()) == ts.component_names
    train = m["counts"]["splits"]["train"]
    assert train["skipped"] == {"invalid_json": 1, "missing_text": 1, "invalid_unicode": 1}
    assert train["components"]["Empty"] == {"documents": 1, "tokens": 0, "bytes": 0, "bytes_per_token": None}
    assert all(c["bytes_per_token"] > 1 for n, c in train["components"].items() if n != "Empty")


def _good_records(path: Path) -> list[dict]:
    import io

    import zstandard

    out = []
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec.get("text"), str) and "\ud800" not in rec["text"]:
                out.append(rec)
    return out


@pytest.mark.dist
def test_rerun_is_a_noop_and_workers_do_not_change_bytes(corpus, shards, tmp_path):
    prep, tok = corpus
    before = (shards / "manifest.json").read_bytes()
    run_tokenize(TokenizeConfig(data=prep, tokenizer=tok, output=shards, workers=2, batch_bytes=5_000))
    assert (shards / "manifest.json").read_bytes() == before
    par = run_tokenize(TokenizeConfig(data=prep, tokenizer=tok, output=tmp_path / "p", workers=2,
                                      batch_bytes=7_000, splits=["train"]))
    for ext in (".bin", ".idx", ".docmeta.npz", ".components.json"):
        assert (par / f"train{ext}").read_bytes() == (shards / f"train{ext}").read_bytes(), ext
    assert not (par / "val.idx").exists()
    # Exports of a split.
    export_split(shards, "val", "nanogpt", tmp_path / "val.bin")
    assert np.array_equal(read_nanogpt(tmp_path / "val.bin"), open_split(shards, "val").dataset.tokens)
    with pytest.raises(ValueError, match="format"):
        export_split(shards, "val", "parquet", tmp_path / "x")
    # The same through the command line (`pilelm shards export`).
    from pilelm.core.cli import main

    assert main(["shards", "export", str(shards), "--split", "val", "--format", "nanogpt",
                 "-o", str(tmp_path / "cli.bin")]) == 0
    assert (tmp_path / "cli.bin").read_bytes() == (tmp_path / "val.bin").read_bytes()


def test_int32_shards_for_a_vocabulary_over_65535(tmp_path):
    # A byte-level BPE with every byte pair as a token: 256 + 65536 ids, so pairs reach past uint16.
    ranks = {bytes([b]): b for b in range(256)}
    for a in range(256):
        for b in range(256):
            ranks[bytes([a, b])] = 256 + a * 256 + b
    tok = tokenizer_from_ranks(ranks, r"\S+|\s+", {"<|endoftext|>": len(ranks)})
    PileTokenizer(tok, "bpe", {"eod": "<|endoftext|>"}, fast=False).save(tmp_path / "tok")
    text = "\xff\xfe\xfd" * 5 + " zz"  # UTF-8 bytes c3 bf c3 be ... -> ids around 50000..65000+
    prep = _prepared(tmp_path / "prep", {"train/a.jsonl.zst": [{"text": text, "meta": {"pile_set_name": "X"}}]})
    out = run_tokenize(TokenizeConfig(data=prep, tokenizer=tmp_path / "tok", output=tmp_path / "s", workers=1))
    ts = open_split(out, "train")
    assert ts.dataset.dtype == np.int32 and ts.vocab_size == 65_793 and ts.eod_id == 65_792
    expected = tok.encode(text).ids + [65_792]
    assert max(expected) > 65_535 and ts.dataset[0].tolist() == expected


def test_tokenize_errors(corpus, tmp_path):
    prep, tok = corpus
    with pytest.raises(ValueError, match="PREPARED_DIR"):
        run_tokenize(TokenizeConfig(data=prep))
    with pytest.raises(StageInputError, match="pilelm prepare"):
        run_tokenize(TokenizeConfig(data=tmp_path, tokenizer=tok, output=tmp_path / "o"))
    with pytest.raises(ConfigError, match="splits"):
        load_config(TokenizeConfig, overrides=["splits=[dev]"])
    with pytest.raises(FileNotFoundError, match="split"):
        run_tokenize(TokenizeConfig(data=_prepared(tmp_path / "p", {"train/a.jsonl.zst": [{"text": "a"}]}),
                                    tokenizer=tok, output=tmp_path / "o", splits=["val"]))
    with pytest.raises(StageInputError, match="tokenize"):
        open_split(prep, "train")


@pytest.mark.dist
def _child_pids(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    out = []
    for t in tasks.iterdir():
        children = (t / "children").read_text().split()
        out += [int(c) for c in children]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("encoder", ["gigatoken", "tiktoken"])
def test_resume_after_sigkill_gives_identical_output(tmp_path, encoder):
    """kill -9 a `pilelm tokenize` mid-split, rerun it: the output equals an uninterrupted run's
    (gigatoken: one process, its reader thread ahead; tiktoken: a pool of worker processes)."""
    docs = [d for p in sorted((SAMPLE / "train").glob("*.zst"))[:2] for d in read_pile_shard(p)]
    prep = _prepared(tmp_path / "prep", {"train/00.jsonl.zst": docs[::2], "train/01.jsonl.zst": docs[1::2]})
    tok = run_tokenizer_train(TokenizerTrainConfig(data=prep, output=tmp_path / "tok", vocab_size=300,
                                                   sample_bytes=200_000))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pilelm", "tokenize", str(prep), "--tokenizer", str(tok), "-o", str(out),
           "--workers", "2", "--batch-bytes", "20000", "--checkpoint-seconds", "0", "--encoder", encoder]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".partial" / "train.progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["documents"] > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    children = _child_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The pool's workers must not outlive their killed parent (they would block forever).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.05)
    assert not any(_alive(p) for p in children)
    assert bool(children) == (encoder == "tiktoken")  # gigatoken runs in the one process
    saved = json.loads(progress.read_text())
    assert 0 < saved["documents"] < len(docs) and not (out / "manifest.json").exists()
    run_tokenize(TokenizeConfig(data=prep, tokenizer=tok, output=out, workers=1))
    ref = run_tokenize(TokenizeConfig(data=prep, tokenizer=tok, output=tmp_path / "ref", workers=1,
                                      batch_bytes=1 << 30))
    for ext in (".bin", ".idx", ".docmeta.npz", ".components.json"):
        assert (out / f"train{ext}").read_bytes() == (ref / f"train{ext}").read_bytes(), ext
    assert read_manifest(out)["counts"] == read_manifest(ref)["counts"]


def test_import_pythia_and_nanogpt_tokens_as_a_shard_dir(corpus, tmp_path):
    from pilelm.core.cli import main

    prep, tok_dir = corpus
    tok = load_tokenizer(tok_dir)
    texts = [r["text"][:400] for r in read_pile_shard(SAMPLE / "val.jsonl.zst")[:12]]
    docs = [np.append(tok.encode(t), tok.eod_id) for t in texts]
    _write_mmidx_by_hand(tmp_path / "pythia", docs, 8, "<u2")  # written as Pythia's files are
    out = tmp_path / "imported"
    assert main(["shards", "import", str(tmp_path / "pythia.bin"), "--tokenizer", str(tok_dir), "-o", str(out),
                 "--component", "Pile"]) == 0
    export_nanogpt(IndexedDataset(tmp_path / "pythia"), tmp_path / "val.bin")
    assert main(["shards", "import", str(tmp_path / "val.bin"), "--format", "nanogpt", "--tokenizer", str(tok_dir),
                 "--split", "val", "-o", str(out)]) == 0
    for split in ("train", "val"):
        ts = open_split(out, split)
        assert [d.tolist() for d in ts.dataset] == [d.tolist() for d in docs]
        assert ts.nbytes.tolist() == [len(t.encode("utf-8")) for t in texts]
        assert ts.eod_id == tok.eod_id and ts.vocab_size == tok.vocab_size
    assert open_split(out, "train").component_names == ["Pile"]
    assert set(read_manifest(out)["counts"]["splits"]) == {"train", "val"}
    # The exporter, and its error for a missing split.
    assert main(["shards", "export", str(out), "--split", "val", "--format", "tfrecord", "-o", str(tmp_path / "v.tfr")]) == 0
    assert len(list(read_tfrecord(tmp_path / "v.tfr"))) == len(docs)
    assert main(["shards", "export", str(out), "--split", "test", "--format", "lmdb", "-o", str(tmp_path / "db")]) == 1


def test_line_batches_tile_the_files_and_resume_anywhere(tmp_path):
    from pilelm.tokens.encode import iter_line_batches

    lines = [b'{"text": "%d"}' % i + b"x" * (i * 7 % 50) for i in range(60)]
    lines[17] = b""  # blank lines keep their numbers
    lines[30] = b"L" * 300  # over the limit below: dropped and counted
    import zstandard

    a, b = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    a.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[:40]) + b"\n"))
    b.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[40:])))  # no final newline
    # What workers see: every non-blank line under its own number (line 31 is dropped).
    want = {(0, n + 1): ln for n, ln in enumerate(lines[:40]) if ln and n != 30}
    want |= {(1, n + 1): ln for n, ln in enumerate(lines[40:])}
    for batch_bytes in (1, 64, 1000, 1 << 20):
        for start in [(0, 0), (0, 5), (0, 30), (0, 39), (0, 40), (1, 0), (1, 7)]:
            got, skipped = {}, 0
            for batch in iter_line_batches([a, b], batch_bytes, start, max_line_bytes=200):
                got |= {(batch.file_index, batch.first_line + i): ln
                        for i, ln in enumerate(batch.data.split(b"\n")[: batch.count]) if ln}
                assert batch.data.count(b"\n") == batch.count
                skipped += batch.skipped["line_too_long"]
            assert got == {k: v for k, v in want.items() if k > start}, (batch_bytes, start)
            assert skipped == (1 if start < (0, 31) else 0)
