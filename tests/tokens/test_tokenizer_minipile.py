"""pilelm tokenize on the real corpus: ids identical to the trained `tokenizers` tokenizer's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_pile_shard, write_pile_shard

from pilelm.core.manifest import write_manifest
from pilelm.tokens.shards import open_split
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.tokens.tokenizer_train import TokenizerTrainConfig, run_tokenizer_train


@pytest.mark.dist
def test_minipile_val_ids_identical_to_tokenizers(minipile, tmp_path):
    # Train on a slice of the bundled sample (not on val), tokenize all of minipile's val with
    # two worker processes on the tiktoken path, compare every document with tokenizers.
    prep = tmp_path / "prep"
    train = read_pile_shard(ROOT / "pilelm" / "sample" / "train" / "02.jsonl.zst")[:150]
    write_pile_shard(prep / "train" / "00.jsonl.zst", train)
    (prep / "val").mkdir(parents=True)
    (prep / "val" / "val.jsonl.zst").symlink_to(Path(minipile, "val.jsonl.zst").resolve())
    write_manifest(prep, "prepare", {"source": "tests"})
    tok_dir = run_tokenizer_train(TokenizerTrainConfig(data=prep, output=tmp_path / "tok", vocab_size=512))
    assert load_tokenizer(tok_dir).backend == "gigatoken"
    out = run_tokenize(TokenizeConfig(data=prep, tokenizer=tok_dir, output=tmp_path / "shards", workers=2,
                                      splits=["val"], batch_bytes=300_000))
    ts = open_split(out, "val")
    val = read_pile_shard(minipile / "val.jsonl.zst")
    assert len(ts) == len(val) == 338
    hf = load_tokenizer(tok_dir, fast=False).hf
    expected = hf.encode_batch([d["text"] for d in val], add_special_tokens=False)
    mismatched = [i for i, e in enumerate(expected) if not np.array_equal(ts.dataset[i][:-1], e.ids)]
    assert mismatched == []
    assert all(ts.dataset[i][-1] == ts.eod_id for i in range(len(ts)))
    assert ts.component_names[ts.component[0]] == val[0]["meta"]["pile_set_name"]
