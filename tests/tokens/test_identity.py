"""The tokenizer's identity (pilelm.tokens.identity): one fingerprint, one check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TEXTS, write_pile_shard

from pilelm.core.manifest import read_manifest, write_manifest
from pilelm.tokens.identity import fingerprint_of, require_same_tokenizer, tokenizer_fingerprint
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize
from pilelm.tokens.tokenizer import PileTokenizer, copy_tokenizer, load_tokenizer
from pilelm.tokens.tokenizer_train import TokenizerTrainConfig, run_tokenizer_train, train_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("id") / "prep"
    docs = [{"text": t, "meta": {"pile_set_name": "Tiny"}} for t in TINY_TEXTS * 3]
    write_pile_shard(root / "train" / "00.jsonl.zst", docs)
    write_pile_shard(root / "val" / "00.jsonl.zst", docs[:4])
    write_manifest(root, "prepare", {"source": "tests"})
    return root


@pytest.fixture(scope="module")
def tok_dir(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("id") / "tok"
    return run_tokenizer_train(TokenizerTrainConfig(data=prepared, output=out, vocab_size=300, min_frequency=1))


def test_fingerprint_survives_load_save_copy_and_a_bare_tokenizer_json(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == read_manifest(tok_dir)["extra"]["fingerprint"]
    assert tokenizer_fingerprint(load_tokenizer(tok_dir, fast=False)) == fp  # the backend is not identity
    tok.save(tmp_path / "saved")
    copy_tokenizer(tok_dir, tmp_path / "copied")
    (tmp_path / "bare").mkdir()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    # Formatting, the decoder and the post-processor do not change which ids a text becomes.
    spec["decoder"], spec["post_processor"] = None, None
    (tmp_path / "bare" / "tokenizer.json").write_text(json.dumps(spec))  # no side files: roles found by name
    for d in ("saved", "copied", "bare"):
        assert tokenizer_fingerprint(load_tokenizer(tmp_path / d)) == fp, d
        assert fingerprint_of(tmp_path / d) == fp, d
    assert fingerprint_of(tok_dir) == fp


def test_fingerprint_differs_for_another_vocab_or_other_special_tokens(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok)
    other_vocab = train_tokenizer(TINY_TEXTS * 3, "bpe", vocab_size=290, min_frequency=1)
    assert tokenizer_fingerprint(other_vocab) != fp
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300 - 5 : 300 - 3]  # two merged tokens swap ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "tokenizer.json").write_text(json.dumps(spec))
    assert fingerprint_of(tmp_path / "swapped") != fp
    # The same vocabulary with the roles of its special tokens exchanged: other eod/pad ids.
    swapped_roles = PileTokenizer(tok.hf, "bpe", {"eod": "<|padding|>", "pad": "<|endoftext|>"})
    assert (swapped_roles.eod_id, swapped_roles.pad_id) == (tok.pad_id, tok.eod_id)
    assert tokenizer_fingerprint(swapped_roles) != fp
    # One more special token.
    extra = load_tokenizer(tok_dir)
    extra.hf.add_special_tokens(["<|mask|>"])
    assert tokenizer_fingerprint(extra) != fp


def test_tokenize_records_the_fingerprint_and_old_shard_dirs_still_have_one(prepared, tok_dir, tmp_path):
    fp = fingerprint_of(tok_dir)
    shards = run_tokenize(TokenizeConfig(data=prepared, tokenizer=tok_dir, output=tmp_path / "shards", workers=1))
    m = read_manifest(shards)
    assert m["extra"]["tokenizer"]["fingerprint"] == fp == fingerprint_of(shards)
    assert fingerprint_of(shards / "tokenizer") == fp  # what the recorded value stands for
    # A shard dir written before fingerprints were recorded: computed from its tokenizer/ copy.
    del m["extra"]["tokenizer"]["fingerprint"]
    (shards / "manifest.json").write_text(json.dumps(m))
    assert fingerprint_of(shards) == fp
    assert require_same_tokenizer(tok_dir, shards) == fp


def test_a_different_tokenizer_is_refused_naming_both_and_the_command(tok_dir, tmp_path):
    other = tmp_path / "other"
    train_tokenizer(TINY_TEXTS * 3, "bpe", vocab_size=290, min_frequency=1).save(other)
    with pytest.raises(ValueError) as e:
        require_same_tokenizer(tok_dir, other, what="init_from")
    msg = str(e.value)
    assert msg.startswith("init_from: ") and str(tok_dir) in msg and str(other) in msg
    assert f"pilelm tokenize PREPARED_DIR --tokenizer {tok_dir} -o SHARD_DIR" in msg
    with pytest.raises(ValueError, match="have different tokenizers .*; do this instead$"):
        require_same_tokenizer(tok_dir, other, fix="do this instead")


def test_shards_import_refuses_a_second_split_with_another_tokenizer(prepared, tok_dir, tmp_path):
    from pilelm.tokens.exchange import ShardImportConfig, run_shard_import
    from pilelm.tokens.formats.nanogpt import export_nanogpt
    from pilelm.tokens.shards import open_split

    shards = run_tokenize(TokenizeConfig(data=prepared, tokenizer=tok_dir, output=tmp_path / "shards", workers=1))
    export_nanogpt(open_split(shards, "val").dataset, tmp_path / "val.bin")
    out = tmp_path / "imported"
    shutil.copytree(shards, out)
    other = tmp_path / "other"
    train_tokenizer(TINY_TEXTS * 3, "bpe", vocab_size=290, min_frequency=1).save(other)
    with pytest.raises(ValueError, match="shards import: .* have different tokenizers"):
        run_shard_import(ShardImportConfig(source=tmp_path / "val.bin", format="nanogpt", tokenizer=other,
                                           output=out, split="test"))
    run_shard_import(ShardImportConfig(source=tmp_path / "val.bin", format="nanogpt", tokenizer=tok_dir,
                                       output=out, split="test"))
    assert read_manifest(out)["extra"]["tokenizer"]["fingerprint"] == fingerprint_of(tok_dir)
    assert [d.tolist() for d in open_split(out, "test").dataset] == [d.tolist() for d in open_split(out, "val").dataset]
