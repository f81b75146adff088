"""Hybrid retrieval: reciprocal rank fusion on tiny rankings, the BM25 index beside the vectors,
and `pilelm search --mode bm25|dense|hybrid`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pilelm.core import cli
from pilelm.evaluation.rank_fusion import (
    DENSE_WEIGHTS,
    calibrate_dense_weight,
    fuse_rankings,
    fused_score_matrix,
    mrr_at,
    rank_positions,
)
from pilelm.evaluation.retrieval import gold_ranks, hybrid_scores
from pilelm.retrieval.hybrid import BM25_DIR, HybridSearcher
from pilelm.retrieval.index import VectorIndex
from pilelm.retrieval.search import open_encoder_for


def test_rrf_sums_reciprocal_ranks_of_each_list():
    fused = dict(fuse_rankings([["a", "b", "c"], ["b", "c", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 62)
    assert fused["d"] == pytest.approx(1 / 63)
    assert [key for key, _ in fuse_rankings([["a", "b", "c"], ["b", "c", "d"]])] == ["b", "c", "a", "d"]


def test_rrf_of_one_ranking_is_that_ranking_and_weights_count():
    assert [key for key, _ in fuse_rankings([[3, 1, 2]])] == [3, 1, 2]
    # A document both lists rank second beats one that only one list ranks first.
    assert fuse_rankings([["x", "both"], ["y", "both"]])[0][0] == "both"
    # Ties keep the first ranking's order; a weight of 0 silences a ranking.
    assert [key for key, _ in fuse_rankings([["p"], ["q"]])] == ["p", "q"]
    assert [key for key, _ in fuse_rankings([["p", "q"], ["q", "p"]], weights=[1, 0])] == ["p", "q"]
    with pytest.raises(ValueError, match="2 weights for 1"):
        fuse_rankings([["p"]], weights=[1, 1])


def test_rank_matrix_cuts_at_depth_and_floor():
    scores = np.array([[0.1, 0.9, 0.5, 0.0], [3.0, 0.0, 0.0, 1.0]])
    ranks = rank_positions(scores, depth=3)
    assert ranks.tolist() == [[3, 1, 2, 0], [1, 3, 0, 2]]  # ties: column order (col 1 before col 2)
    assert rank_positions(scores, depth=3, floor=0.0).tolist() == [[3, 1, 2, 0], [1, 0, 0, 2]]
    fused = fused_score_matrix([ranks, ranks], k=0)
    assert fused[0].tolist() == pytest.approx([2 / 3, 2.0, 1.0, 0.0])


def test_matrix_fusion_agrees_with_list_fusion():
    rng = np.random.default_rng(0)
    dense, bm25 = rng.normal(size=(4, 9)), np.maximum(rng.normal(size=(4, 9)), 0)
    fused = hybrid_scores(dense, bm25, depth=5)
    for q in range(4):
        lists = [list(np.argsort(-bm25[q], kind="stable")[:5]), list(np.argsort(-dense[q], kind="stable")[:5])]
        lists[0] = [d for d in lists[0] if bm25[q, d] > 0]
        expected = dict(fuse_rankings(lists))
        for d in range(9):
            assert fused[q, d] == pytest.approx(expected.get(d, 0.0))


def test_fusion_rescues_an_answer_both_sides_rank_high():
    # Answer 0 is 2nd by BM25 and 2nd by dense; each side's own 1st is a different wrong answer.
    bm25 = np.array([[5.0, 9.0, 1.0, 0.0]])
    dense = np.array([[0.8, 0.1, 0.2, 0.9]])
    assert gold_ranks(bm25)[0] == 2 and gold_ranks(dense)[0] == 2
    assert gold_ranks(hybrid_scores(dense, bm25))[0] == 1


def test_embed_writes_a_bm25_index_hashed_in_the_manifest(tiny_index):
    index = VectorIndex(tiny_index)
    files = index.manifest["extra"]["files"]
    assert (tiny_index / BM25_DIR).is_dir() and any(name.startswith(BM25_DIR + "/") for name in files)


def test_every_mode_finds_the_document_a_query_was_cut_from(tiny_index):
    index = VectorIndex(tiny_index)
    searcher = HybridSearcher(index)
    encoder = open_encoder_for(index)
    for row in (1, 4, 7):
        query = " ".join(index.chunk_text(index.docs[row]["first_chunk"]).split()[:12])
        for mode in ("bm25", "dense", "hybrid"):
            hits = searcher.search(query, 3, mode, encoder)
            assert hits and hits[0].doc == row, (mode, row)
            assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
            assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))


def test_search_cli_modes(tiny_index, capsys):
    index = VectorIndex(tiny_index)
    query = " ".join(index.chunk_text(index.docs[3]["first_chunk"]).split()[:12]).replace(":", "")  # no YAML key
    for mode in ("bm25", "dense", "hybrid"):
        assert cli.main(["search", str(tiny_index), query, "-k", "2", "--json", "--mode", mode]) == 0
        assert json.loads(capsys.readouterr().out)[0]["id"] == index.docs[3]["id"]
    assert cli.main(["search", str(tiny_index), query, "--mode", "fuzzy"]) != 0
    assert "bm25" in capsys.readouterr().err


def test_an_index_without_bm25_names_the_fix(tiny_index, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    shutil.rmtree(old / BM25_DIR)
    assert cli.main(["search", str(old), "a query", "--mode", "hybrid"]) != 0
    err = capsys.readouterr().err
    assert "pilelm embed" in err and "--mode dense" in err
    assert cli.main(["search", str(old), "a query", "--mode", "dense"]) == 0


def test_calibration_drops_a_useless_dense_ranking_and_keeps_a_good_one():
    rng = np.random.default_rng(0)
    n = 40
    bm25 = rng.random((n, n))
    bm25[np.arange(n), np.roll(np.arange(n), 1)] += 2.0  # BM25's first hit is wrong...
    bm25[np.arange(n), np.arange(n)] += 1.5  # ...its second is the answer
    noise = rng.normal(size=(n, n))
    weight, table = calibrate_dense_weight(noise, bm25, np.arange(n))
    assert weight < 0.5 and table["0"] >= table["1"]
    # At weight 0 the fusion is BM25's ranking: calibrated hybrid never scores below BM25.
    assert table["0"] == pytest.approx(mrr_at(bm25, np.arange(n)))
    perfect = np.eye(n)
    weight, table = calibrate_dense_weight(perfect, bm25, np.arange(n))
    assert weight > 0 and table[f"{weight:g}"] > 0.95 > table["0"]


def test_embed_records_the_calibrated_fusion_weight(tiny_index):
    fusion = VectorIndex(tiny_index).manifest["extra"]["fusion"]
    assert fusion["dense_weight"] in DENSE_WEIGHTS or fusion["pairs"] < 2
