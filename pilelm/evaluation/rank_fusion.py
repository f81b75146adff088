"""Reciprocal rank fusion (RRF): one ranking from several, by rank alone.

Cormack, Clarke & Buettcher 2009, "Reciprocal Rank Fusion outperforms Condorcet and individual
rank learning methods": a document's fused score is the sum over rankings of

    weight / (k + rank)        (rank 1-based; k = 60, the paper's constant)

and a ranking that does not hold the document adds nothing. Ranks, not scores, are fused, so
BM25's unbounded scores and a dense model's cosines need no calibration; plain score averaging
is what RRF beat (BEIR NQ nDCG@10: BM25 0.306, RRF with a dense model 0.483, score average
0.324, as the issue that asked for hybrid search reports).

``fuse_rankings`` fuses lists (a search), ``fused_score_matrix`` fuses (queries, documents)
score matrices (an evaluation), each ranking cut at ``depth`` as a search engine returns only
its top hits.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

import numpy as np

RRF_K = 60
"""Cormack et al. 2009's constant: large enough that the first few ranks do not dominate."""
DEPTH = 100
"""Hits each ranking contributes (a search engine's first page of candidates)."""

Key = TypeVar("Key", bound=Hashable)


def fuse_rankings(rankings: Sequence[Sequence[Key]], k: int = RRF_K,
                  weights: Sequence[float] | None = None) -> list[tuple[Key, float]]:
    """(key, fused score) best first. Ties keep the order of first appearance (the first
    ranking's order before the second's), so fusing one ranking returns it unchanged."""
    if k < 0:
        raise ValueError(f"RRF k must be >= 0, got {k}")
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    fused: dict[Key, float] = {}
    for weight, ranking in zip(weights, rankings, strict=True):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])  # sorted() is stable: ties keep first appearance


def rank_positions(scores: np.ndarray, depth: int = DEPTH, floor: float | None = None) -> np.ndarray:
    """(Q, D) scores -> (Q, D) 1-based ranks within each row, 0 where a document is not among
    the row's top ``depth`` or scores at most ``floor`` (BM25: 0 = no query word, not retrieved).
    Equal scores rank in column order (a stable sort), as a search engine breaks ties."""
    q, d = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # (Q, depth) columns, best first
    ranks = np.zeros((q, d), dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(1, order.shape[1] + 1)[None, :].repeat(q, axis=0), axis=1)
    if floor is not None:
        ranks[scores <= floor] = 0
    return ranks


def fused_score_matrix(rank_matrices: Sequence[np.ndarray], k: int = RRF_K,
                       weights: Sequence[float] | None = None) -> np.ndarray:
    """(Q, D) RRF scores from (Q, D) rank matrices (``rank_positions``: 0 = not retrieved)."""
    weights = [1.0] * len(rank_matrices) if weights is None else list(weights)
    if len(weights) != len(rank_matrices):
        raise ValueError(f"{len(weights)} weights for {len(rank_matrices)} rankings")
    fused = np.zeros(rank_matrices[0].shape, dtype=np.float64)
    for weight, ranks in zip(weights, rank_matrices, strict=True):
        fused += np.where(ranks > 0, weight / (k + np.maximum(ranks, 1)), 0.0)
    return fused


DENSE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
"""The dense ranking's weights ``calibrate_dense_weight`` tries (BM25's is 1)."""


def mrr_at(scores: np.ndarray, gold: np.ndarray, at: int = 10) -> float:
    """MRR@``at`` of (Q, D) scores whose query q's answer is column ``gold[q]`` (ties count against)."""
    ranks = (scores >= scores[np.arange(len(gold)), gold][:, None]).sum(axis=1)
    return float(np.mean(np.where(ranks <= at, 1.0 / ranks, 0.0)))


def calibrate_dense_weight(dense: np.ndarray, bm25: np.ndarray, gold: np.ndarray, depth: int = DEPTH,
                           weights: Sequence[float] = DENSE_WEIGHTS) -> tuple[float, dict[str, float]]:
    """The dense weight of the fusion (BM25's is 1) with the best MRR@10 on calibration queries
    whose answers are known, and each weight's MRR@10. Plain RRF (weight 1) assumes both rankings
    are about as good; a dense model trained on little data is much worse than BM25, and fusing it
    at full weight pulls BM25's answers down (k = 60 makes rank 1 and rank 10 nearly equal, so the
    weaker ranking's noise decides). Ties go to the smaller weight: at weight 0 the fusion is BM25's
    ranking, so a calibrated hybrid is never worse than BM25 on the calibration queries."""
    ranks = [rank_positions(bm25, depth, floor=0.0), rank_positions(dense, depth)]
    table = {f"{w:g}": mrr_at(fused_score_matrix(ranks, weights=[1.0, w]) + 1e-9 * bm25, gold) for w in weights}
    best = max(weights, key=lambda w: (table[f"{w:g}"], -w))
    return float(best), table
