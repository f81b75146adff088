"""A shard dir holds the splits its manifest lists and no others: a rewrite with fewer splits
removes the rest, and ``open_split`` refuses a split file the manifest does not list."""

from __future__ import annotations

import shutil

import pytest

from pilelm.core.manifest import read_manifest
from pilelm.tokens.shards import listed_splits, open_split
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize


@pytest.fixture()
def prepared(tmp_path):
    from conftest import TINY_TEXTS, write_pile_shard

    from pilelm.core.manifest import write_manifest

    prep = tmp_path / "prep"
    for split in ("train", "val"):
        write_pile_shard(prep / split / "00.jsonl.zst", [{"text": t, "meta": {"pile_set_name": "A"}}
                                                         for t in TINY_TEXTS])
    write_manifest(prep, "prepare", {})
    return prep


def test_a_rewrite_with_fewer_splits_removes_the_others(prepared, tiny_run, tmp_path):
    out = tmp_path / "shards"
    run_tokenize(TokenizeConfig(data=prepared, tokenizer=tiny_run / "tokenizer", output=out, workers=1))
    assert listed_splits(out) == ["train", "val"] and len(open_split(out, "val")) == len(open_split(out, "train"))

    run_tokenize(TokenizeConfig(data=prepared, tokenizer=tiny_run / "tokenizer", output=out, workers=1,
                                splits=["train"]))
    assert sorted(read_manifest(out)["counts"]["splits"]) == ["train"]
    assert listed_splits(out) == ["train"]
    assert not [p.name for p in out.iterdir() if p.name.startswith("val.")]
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        open_split(out, "val")


def test_open_split_refuses_a_split_the_manifest_does_not_list(prepared, tiny_run, tmp_path):
    out = tmp_path / "shards"
    run_tokenize(TokenizeConfig(data=prepared, tokenizer=tiny_run / "tokenizer", output=out, workers=1,
                                splits=["train"]))
    for suffix in (".bin", ".idx", ".docmeta.npz", ".components.json"):  # a stray split from elsewhere
        shutil.copy(out / f"train{suffix}", out / f"val{suffix}")
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        open_split(out, "val")
