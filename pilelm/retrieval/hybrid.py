"""Hybrid search over an index directory: BM25 over its chunks + the dense vectors, fused by RRF.

A small model trained on one corpus does not beat BM25 alone, while BM25 and a dense retriever
fused by reciprocal rank fusion beat both (MS MARCO dev MRR@10: BM25 0.184, dense 0.335, hybrid
0.353; measured here: ``benchmarks/retrieval_qa.py``). ``pilelm embed`` therefore writes a BM25
index of the same chunks beside the vectors:

    INDEX/bm25/            ``bm25s``'s saved index (its files hashed in the manifest as bm25/NAME)

Modes (``--mode``): ``bm25`` (words only: no model is loaded), ``dense`` (the vectors) and
``hybrid`` (default: each side's top ``DEPTH`` documents fused, ``rank_fusion.fuse_rankings``).
A document scores its best chunk on either side; a hybrid hit shows the chunk of the side that
ranked it higher, and its score is the fused one.

The fusion weighs BM25 1 and the dense ranking ``dense_weight``, which ``pilelm embed``
calibrates on the corpus itself (``calibrate_fusion``: pairs mined from a sample of the indexed
documents, each query ranked over the pairs' positives; the weight with the best MRR@10, ties
to the smaller) and records in the manifest (``extra.fusion``). Plain RRF (weight 1) assumes two
rankings of similar quality; with a weak dense model it pulls BM25's answers down (measured:
``benchmarks/retrieval_qa.py``), while a calibrated weight of 0 leaves BM25's ranking as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pilelm.core.manifest import content_hash
from pilelm.evaluation.rank_fusion import DEPTH, calibrate_dense_weight, fuse_rankings
from pilelm.evaluation.retrieval import (
    bm25_query_scores,
    bm25_retriever,
    bm25_scores,
    bm25_words,
    dense_scores,
)
from pilelm.retrieval.index import CHUNKS, EMBED_HINT, Hit, VectorIndex
from pilelm.retrieval.pair_kinds import mine_document

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
MODES = ("bm25", "dense", "hybrid")
Mode = Literal["bm25", "dense", "hybrid"]


def chunk_texts(index_dir: Path) -> list[str]:
    with open(index_dir / CHUNKS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def build_bm25(index_dir: Path) -> dict[str, str]:
    """Write ``INDEX/bm25/`` over the index's chunks; returns its files' hashes (``bm25/NAME``)."""
    import shutil

    out = index_dir / BM25_DIR
    tmp = index_dir / (BM25_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bm25_retriever(chunk_texts(index_dir)).save(str(tmp), show_progress=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the folder appears whole or not at all
    return {f"{BM25_DIR}/{f.name}": content_hash(f) for f in sorted(out.iterdir())}


CALIBRATION_PAIRS = 200
"""Mined pairs ``calibrate_fusion`` scores the fusion weights on (more: slower embed, steadier weight)."""


def calibrate_fusion(documents: list[tuple[str, str]], encoder: Any, max_pairs: int = CALIBRATION_PAIRS,
                     seed: int = 0) -> dict[str, Any]:
    """The dense weight for hybrid search, chosen on (query, positive) pairs mined from
    ``documents`` ((text, component) each): {"dense_weight", "pairs", "mrr@10" per weight}.
    Fewer than 2 pairs: weight 1 (plain RRF), nothing measured."""
    rng = np.random.default_rng(seed)
    pairs = [(q, p) for text, comp in documents for q, p, _ in mine_document(text, comp, ["qa", "title", "crop"], rng)]
    if len(pairs) < 2:
        return {"dense_weight": 1.0, "pairs": len(pairs)}
    pick = sorted(rng.choice(len(pairs), size=min(max_pairs, len(pairs)), replace=False).tolist())
    queries, positives = [pairs[i][0] for i in pick], [pairs[i][1] for i in pick]
    dense, _ = dense_scores(encoder, queries, positives)
    weight, table = calibrate_dense_weight(dense, bm25_scores(queries, positives), np.arange(len(pick)))
    log.info("hybrid fusion: dense weight %g (MRR@10 on %d mined pairs: %s)", weight, len(pick),
             ", ".join(f"{w} {m:.3f}" for w, m in table.items()))
    return {"dense_weight": weight, "pairs": len(pick), "mrr@10": table}


def load_bm25(index: VectorIndex, verify: bool = True) -> Any:
    """The index's BM25 over its chunks; an index built before hybrid search is an error naming the fix."""
    import bm25s

    folder = index.path / BM25_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"index {index.path} has no BM25 index ({BM25_DIR}/): it predates hybrid search; "
                                f"rebuild it with `{EMBED_HINT}`, or search it with --mode dense")
    hashes = index.manifest.get("extra", {}).get("files", {})
    for name, digest in hashes.items():
        if verify and name.startswith(BM25_DIR + "/") and content_hash(index.path / name) != digest:
            raise ValueError(f"index file {index.path / name} is corrupted (its hash differs from the manifest's); "
                             f"rebuild the index with `{EMBED_HINT}`")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s.BM25.load(str(folder), show_progress=False)


def best_chunk_per_doc(index: VectorIndex, chunk_scores: np.ndarray, depth: int) -> list[tuple[int, float, int]]:
    """(doc, score, chunk row) of the ``depth`` best documents by their best chunk (score > 0)."""
    order = np.argsort(-chunk_scores, kind="stable")
    best: dict[int, tuple[float, int]] = {}
    for row in order:
        score = float(chunk_scores[row])
        if score <= 0 or len(best) >= depth:
            break
        best.setdefault(int(index.chunk_doc[row]), (score, int(row)))
    return [(doc, score, row) for doc, (score, row) in best.items()]


class HybridSearcher:
    """Search one index by BM25, by its vectors, or both fused."""

    def __init__(self, index: VectorIndex):
        self.index = index
        self._bm25: Any = None

    @property
    def bm25(self) -> Any:
        if self._bm25 is None:
            self._bm25 = load_bm25(self.index)
        return self._bm25

    def _hit(self, rank: int, doc: int, score: float, row: int) -> Hit:
        d = self.index.docs[doc]
        return Hit(rank, doc, d["id"], d.get("component", ""), score, row - d["first_chunk"], self.index.chunk_text(row))

    def bm25_hits(self, query: str, k: int) -> list[Hit]:
        scores = bm25_query_scores(self.bm25, bm25_words([query])[0])
        return [self._hit(r, doc, s, row) for r, (doc, s, row) in enumerate(best_chunk_per_doc(self.index, scores, k), 1)]

    @property
    def dense_weight(self) -> float:
        """The index's calibrated dense weight (1, plain RRF, for an index that records none)."""
        return float(self.index.manifest.get("extra", {}).get("fusion", {}).get("dense_weight", 1.0))

    def search(self, query: str, k: int, mode: Mode = "hybrid", encoder: Any = None,
               exclude: int | None = None, dense_weight: float | None = None) -> list[Hit]:
        """The ``k`` best documents for ``query`` (``encoder`` embeds it for dense and hybrid);
        ``dense_weight`` None = the index's calibrated one."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "bm25":
            return [h for h in self.bm25_hits(query, k + (exclude is not None)) if h.doc != exclude][:k]
        if encoder is None:
            raise ValueError(f"{mode} search needs the index's encoder to embed the query")
        vector = encoder.embed_queries([query])[0]
        if mode == "dense":
            return self.index.search(vector, k, exclude=exclude)
        depth = max(k, DEPTH)
        dense = [h for h in self.index.search(vector, depth) if h.doc != exclude]
        lexical = [h for h in self.bm25_hits(query, depth + 1) if h.doc != exclude]
        by_doc: dict[int, Hit] = {}
        for h in lexical + dense:  # the side that ranks a document higher shows its chunk
            if h.doc not in by_doc or h.rank < by_doc[h.doc].rank:
                by_doc[h.doc] = h
        weight = self.dense_weight if dense_weight is None else dense_weight
        fused = fuse_rankings([[h.doc for h in lexical], [h.doc for h in dense]], weights=[1.0, weight])  # ties: BM25's
        return [replace(by_doc[doc], rank=rank, score=score) for rank, (doc, score) in enumerate(fused[:k], start=1)]
