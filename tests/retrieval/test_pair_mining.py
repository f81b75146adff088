"""pilelm mine-pairs: question/answer, title/body and crop pairs, with BM25 hard negatives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_pile_shard

from pilelm.core import cli
from pilelm.retrieval.contrastive import read_pair_files
from pilelm.retrieval.pair_kinds import crop_pairs, mine_document, title_pair
from pilelm.retrieval.pair_mining import MinePairsConfig

ARTICLE = " ".join(f"word{i}" for i in range(100))


def test_title_pairs_need_a_short_first_line():
    assert title_pair("Python\nPython is a programming language with dynamic types.") == (
        "Python", "Python is a programming language with dynamic types.")
    assert title_pair("This first line is a sentence, not a title.\nand the body goes on for a while here") is None
    assert title_pair("def main():\n    return a_function_call(with, some, arguments)") is None
    assert title_pair("Title\nshort") is None


def test_crops_are_spans_of_the_document():
    rng = np.random.default_rng(0)
    pairs = crop_pairs(ARTICLE, rng, count=5, max_words=30)
    assert len(pairs) == 5
    for q, p in pairs:
        for crop in (q, p):
            words = crop.split()
            assert 10 <= len(words) <= 30 and crop in ARTICLE  # 10-50 % of 100 words, one contiguous span
    assert crop_pairs("too short to crop", rng, 3, 30) == []


def test_a_thread_gives_its_question_and_answer():
    text = "Q:\n\nHow do I sort a list in place?\n\nA:\n\nCall list.sort(); sorted() returns a new list."
    pairs = mine_document(text, "StackExchange", ["qa", "title", "crop"], np.random.default_rng(0))
    assert pairs[0] == ("How do I sort a list in place?", "Call list.sort(); sorted() returns a new list.", "qa")
    assert mine_document(text, "StackExchange", ["crop"], np.random.default_rng(0)) == []  # too short to crop


def test_mine_pairs_adds_a_hard_negative_from_another_document(tmp_path):
    docs = [
        {"text": "Q:\n\nHow do I reverse a list in python?\n\nA:\n\nUse list.reverse() to reverse the list in place.",
         "meta": {"pile_set_name": "StackExchange"}},
        {"text": "Q:\n\nHow do I copy a list in python?\n\nA:\n\nA slice copies a list: new = old[:] in python.",
         "meta": {"pile_set_name": "StackExchange"}},
        {"text": "Debugging extensions\nAn extension module is debugged with gdb and a debug build of python.",
         "meta": {"pile_set_name": "Wikipedia (en)"}},
    ]
    corpus = write_pile_shard(tmp_path / "docs.jsonl.zst", docs)
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["mine-pairs", str(corpus), "-o", str(out), "--kinds", "qa", "--kinds", "title"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["qa", "qa", "title"]
    assert recs[2]["query"] == "Debugging extensions"
    # Each list question's negative is the other's answer (BM25's best wrong match); the title
    # shares no word with another document's positive, so it has none.
    assert recs[0]["negative"] == recs[1]["positive"] and recs[1]["negative"] == recs[0]["positive"]
    assert "negative" not in recs[2]
    # The file is what finetune-contrastive reads.
    assert [n is not None for _, _, n in read_pair_files([str(out)])] == [True, True, False]


def test_mine_pairs_refuses_bad_kinds_and_too_few_pairs(tmp_path, capsys):
    with pytest.raises(ValueError, match="use some of qa, title, crop"):
        MinePairsConfig(kinds=["questions"])
    corpus = write_pile_shard(tmp_path / "d.jsonl.zst", [{"text": "x", "meta": {"pile_set_name": "Pile-CC"}}])
    assert cli.main(["mine-pairs", str(corpus), "-o", str(tmp_path / "p.jsonl")]) != 0
    assert "0 pairs mined from 1 documents" in capsys.readouterr().err
