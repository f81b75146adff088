"""eval --task retrieval (metrics, BM25 baseline) and contrastive fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_pile_shard

from pilelm.core import cli
from pilelm.core.manifest import read_manifest
from pilelm.evaluation.retrieval import bm25_scores, dense_scores, gold_ranks, qa_pair, rank_metrics
from pilelm.inference.text_encoder import TextEncoder
from pilelm.retrieval import contrastive
from pilelm.training.checkpoint import load_for_inference

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


def _pairs_file(path):
    path.write_text("".join(json.dumps({"query": q, "positive": a}) + "\n" for q, a in TOPICS))
    return path


def _mrr(run) -> float:
    enc = TextEncoder.from_run(run)
    scores, _ = dense_scores(enc, [q for q, _ in TOPICS], [a for _, a in TOPICS])
    return rank_metrics(gold_ranks(scores))["mrr@10"]


def test_contrastive_fine_tuning_learns_its_pairs(tiny_run, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune-contrastive", str(tiny_run), "--pairs", str(_pairs_file(tmp_path / "pairs.jsonl")),
            "-o", str(out), "--steps", "40", "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "2"]
    assert cli.main(argv) == 0
    m = read_manifest(out)
    assert m["stage"] == "train" and m["extra"]["objective"] == "contrastive"
    assert m["counts"]["final_loss"] < m["counts"]["first_loss"]
    assert _mrr(out) > _mrr(tiny_run)
    assert _mrr(out) == 1.0


def test_a_killed_contrastive_run_resumes_to_the_same_weights(tiny_run, tmp_path, monkeypatch):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["--pairs", str(pairs), "--steps", "6", "--batch-size", "4", "--save-every", "3", "--lr", "1e-3"]
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "whole"), *common]) == 0
    real, calls = contrastive.info_nce, []

    def dies_at_step_4(q, p, t, negatives=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(q, p, t, negatives)

    monkeypatch.setattr(contrastive, "info_nce", dies_at_step_4)
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "cut"), *common]) == 130
    monkeypatch.setattr(contrastive, "info_nce", real)
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "cut"), *common]) == 0
    a, _, _ = load_for_inference(tmp_path / "whole")
    b, _, _ = load_for_inference(tmp_path / "cut")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_mined_pairs_come_from_threads_and_first_paragraphs():
    assert contrastive.mined_pair("Q:\n\nWhy?\n\nA:\n\nBecause.", "StackExchange") == ("Why?", "Because.")
    head = "A first paragraph that is long enough to be a query."
    rest = "The rest of the document, also long enough to be a positive."
    assert contrastive.mined_pair(f"{head}\n\n{rest}", "Wikipedia (en)") == (head, rest)
    assert contrastive.mined_pair("short\n\nrest", "Pile-CC") is None


def test_finetune_task_contrastive_runs_the_same_training(tiny_run, tmp_path):
    """`pilelm finetune --task contrastive` maps its config onto finetune-contrastive's."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["--lr", "3e-3", "--warmup-steps", "2"]
    assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(tmp_path / "old"),
                     "--steps", "6", "--batch-size", "6", "--save-every", "6", *common]) == 0
    assert cli.main(["finetune", str(tiny_run), "--task", "contrastive", "--data", str(pairs), "-o",
                     str(tmp_path / "new"), "loop.max_steps=6", "loop.batch_size=6", "loop.eval_every=6",
                     "optim.lr=3e-3", "schedule.warmup_steps=2", "optim.weight_decay=0.01", "loop.seed=0",
                     "max_length=128"]) == 0
    old, new = read_manifest(tmp_path / "old"), read_manifest(tmp_path / "new")
    assert new["extra"]["objective"] == "contrastive" and new["counts"]["pairs"] == old["counts"]["pairs"]
    assert new["counts"]["final_loss"] == pytest.approx(old["counts"]["final_loss"], rel=1e-6)


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


def test_contrastive_fine_tuning_with_hard_negatives(tiny_run, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": a, "negative": TOPICS[(i + 1) % len(TOPICS)][1]})
                             + "\n" for i, (q, a) in enumerate(TOPICS)))
    out = tmp_path / "ft"
    assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(out), "--steps", "30",
                     "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "2"]) == 0
    m = read_manifest(out)
    assert m["counts"]["hard_negatives"] == len(TOPICS)
    assert m["counts"]["final_loss"] < m["counts"]["first_loss"]
    assert _mrr(out) > _mrr(tiny_run)


def test_a_contrastive_run_refuses_to_resume_with_another_config(tiny_run, tmp_path):
    """Resuming with another learning rate would not give the uninterrupted run's weights: refused,
    naming the key; more steps (how long it runs) resume."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(tmp_path / "ft"),
              "--batch-size", "4", "--save-every", "2"]
    assert cli.main([*common, "--steps", "2", "--lr", "1e-3"]) == 0
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.002"):
        contrastive.run_contrastive(contrastive.ContrastiveConfig(
            run=str(tiny_run), pairs=[str(pairs)], output=str(tmp_path / "ft"), steps=4, batch_size=4,
            save_every=2, lr=2e-3))
    assert cli.main([*common, "--steps", "4", "--lr", "1e-3"]) == 0
    assert read_manifest(tmp_path / "ft")["counts"]["steps"] == 4
