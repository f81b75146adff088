"""eval --task retrieval (metrics, BM25 baseline) and contrastive pairs (training: test_contrastive.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import write_pile_shard

from pilelm.core import cli
from pilelm.core.manifest import read_manifest
from pilelm.evaluation.retrieval import bm25_scores, gold_ranks, qa_pair, rank_metrics
from pilelm.retrieval import contrastive

TOPICS = [
    ("How do I cook rice?", "Rinse the rice, add water, simmer rice for twenty minutes."),
    ("Why is the sky blue?", "Rayleigh scattering of sunlight makes the sky look blue."),
    ("What is a fox?", "A fox is a small wild canine; the quick brown fox jumps."),
    ("Where is Zürich?", "Zürich is a city in Switzerland with a café on every street."),
    ("How to pack a box?", "Pack my box with five dozen liquor jugs, heavy ones first."),
    ("What does emoji mean?", "An emoji like 🎉 or 🚀 is a picture character in text."),
]


def se_doc(q: str, a: str) -> dict:
    return {"text": f"Q:\n\n{q}\n\nA:\n\n{a}\n\nA:\n\nanother answer", "meta": {"pile_set_name": "StackExchange"}}


def test_qa_pair_reads_the_piles_stackexchange_layout():
    assert qa_pair("Q:\n\nWhy?\n\nA:\n\nBecause.\n\nA:\n\nNo.") == ("Why?", "Because.")
    assert qa_pair("Q:\n\nWhy?\n\nno answer here") is None
    assert qa_pair("Some article\n\nA:\n\nx") is None


def test_ties_count_against_the_answer_and_metrics_follow():
    flat = np.ones((3, 3))
    assert gold_ranks(flat).tolist() == [3, 3, 3]  # a constant scorer is not perfect
    assert gold_ranks(np.eye(3)).tolist() == [1, 1, 1]
    m = rank_metrics(np.array([1, 2, 11, 10]))
    assert m["recall@1"] == 0.25 and m["recall@10"] == 0.75
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0 + 0.1) / 4)


def test_bm25_finds_answers_that_share_words_with_their_question():
    questions, answers = [q for q, _ in TOPICS], [a for _, a in TOPICS]
    ranks = gold_ranks(bm25_scores(questions, answers))
    assert rank_metrics(ranks)["recall@1"] >= 0.5


def test_eval_task_retrieval_writes_a_table_a_plot_and_a_manifest(tiny_run, tmp_path):
    docs = [se_doc(q, a) for q, a in TOPICS] + [{"text": "not a thread", "meta": {"pile_set_name": "Pile-CC"}}]
    data = write_pile_shard(tmp_path / "test.jsonl.zst", docs)
    out = tmp_path / "eval"
    assert cli.main(["eval", str(tiny_run), "--task", "retrieval", "--data", str(data), "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pairs"] == len(TOPICS)
    for m in [*results["runs"].values(), results["baselines"]["bm25"]]:
        assert 0 <= m["recall@1"] <= m["recall@10"] <= 1 and 0 <= m["mrr@10"] <= 1
        assert m["queries"] == len(TOPICS)
    assert "bm25 (baseline)" in (out / "results.md").read_text()
    assert (out / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(out)["extra"]["task"] == "retrieval"


def test_eval_task_retrieval_needs_pairs(tiny_run, tmp_path, capsys):
    data = write_pile_shard(tmp_path / "test.jsonl.zst", [{"text": "plain", "meta": {"pile_set_name": "Pile-CC"}}])
    assert cli.main(["eval", str(tiny_run), "--task", "retrieval", "--data", str(data), "-o", str(tmp_path / "e")]) == 1
    assert "0 StackExchange question/answer pairs" in capsys.readouterr().err


def test_mined_pairs_come_from_threads_and_first_paragraphs():
    assert contrastive.mined_pair("Q:\n\nWhy?\n\nA:\n\nBecause.", "StackExchange") == ("Why?", "Because.")
    head = "A first paragraph that is long enough to be a query."
    rest = "The rest of the document, also long enough to be a positive."
    assert contrastive.mined_pair(f"{head}\n\n{rest}", "Wikipedia (en)") == (head, rest)
    assert contrastive.mined_pair("short\n\nrest", "Pile-CC") is None


def test_hard_negatives_are_extra_columns_of_the_query_side(tmp_path):
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    base = contrastive.info_nce(q, q, 0.1)
    assert contrastive.info_nce(q, q, 0.1, q[:0]) == base  # no negatives: the in-batch loss
    assert contrastive.info_nce(q, q, 0.1, q[:1]) > base  # a negative as close as a positive costs
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "q1", "positive": "p1", "negative": "n1"}) + "\n"
                    + json.dumps({"query": "q2", "positive": "p2"}) + "\n")
    assert contrastive.read_pair_files([str(path)]) == [("q1", "p1", "n1"), ("q2", "p2", None)]
    path.write_text(json.dumps({"query": "q", "positive": "p", "negative": 3}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: \"negative\" must be a string"):
        contrastive.read_pair_files([str(path)])


def test_pair_files_refuse_non_strings_count_empty_pairs_and_ignore_a_bom(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "q1", "positive": "p1"}) + "\n"
                    + json.dumps({"query": ["q2"], "positive": "p2"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: \"query\" must be a string, got list"):
        contrastive.read_pair_files([str(path)])
    path.write_text(json.dumps({"query": "q1", "positive": 5}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: \"positive\" must be a string, got int"):
        contrastive.read_pair_files([str(path)])
    path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in
                            (("q1", "p1"), ("", "p2"), ("q3", " "), ("q4", "p4"))))
    with caplog.at_level(logging.WARNING):
        assert contrastive.read_pair_files([str(path)]) == [("q1", "p1", None), ("q4", "p4", None)]
    assert any("skipped 2 pair(s)" in r.message and "pairs.jsonl:2" in r.message for r in caplog.records)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "q1", "positive": "p1"}).encode() + b"\n")
    assert contrastive.is_pairs_file(path)  # a BOM does not turn a pairs file into documents to mine
    assert contrastive.read_pair_files([str(path)]) == [("q1", "p1", None)]
    path.write_bytes(json.dumps({"query": "q1", "positive": "p1"}).encode() + b'\n{"query": "\xe9"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not UTF-8"):
        contrastive.read_pair_files([str(path)])
