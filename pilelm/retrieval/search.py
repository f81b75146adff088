"""``pilelm search INDEX "query"`` and ``pilelm similar INDEX --doc ID``: ranked documents.

``search`` ranks by BM25 and the index's vectors fused by reciprocal rank fusion
(``--mode hybrid``, the default: see ``retrieval/hybrid.py``), or by either alone
(``--mode bm25`` loads no model; ``--mode dense``). A query is embedded by the model that built the index (the run named in its manifest, or
``--run``); a run whose weights, tokenizer or pooling differ from the index's is refused,
naming both, because its vectors would not be comparable. A document scores its best chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pilelm.inference.text_encoder import TextEncoder
from pilelm.models.dtypes import DTYPES
from pilelm.retrieval.hybrid import HybridSearcher, Mode
from pilelm.retrieval.index import Hit, VectorIndex


@dataclass
class SearchConfig:
    index: str = ""
    """Index directory (pilelm embed output)."""
    query: str = ""
    """The query text."""
    k: int = 10
    """How many documents to return."""
    json: bool = False
    """Print the results as JSON instead of a table."""
    snippet_chars: int = 200
    """Characters of the best chunk shown per result."""
    mode: Mode = "hybrid"
    """Ranking: hybrid (BM25 + vectors, reciprocal rank fusion), bm25 (words only) or dense (vectors only)."""
    dense_weight: float | None = None
    """Hybrid: the dense ranking's weight in the fusion (BM25's is 1); None = the one pilelm embed calibrated."""
    run: str = ""
    """Run whose model embeds the query; empty = the run that built the index."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.snippet_chars < 10:
            raise ValueError(f"snippet_chars must be >= 10, got {self.snippet_chars}")


@dataclass
class SimilarConfig:
    index: str = ""
    """Index directory (pilelm embed output)."""
    doc: str = ""
    """Document id (as in the index's docs.jsonl, e.g. FILE:LINE) or row:N for the N-th document."""
    k: int = 10
    """How many documents to return (the document itself excluded)."""
    json: bool = False
    """Print the results as JSON instead of a table."""
    snippet_chars: int = 200
    """Characters of the best chunk shown per result."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def open_encoder_for(index: VectorIndex, run: str = "", device: str = "cpu") -> TextEncoder:
    """The encoder that embeds queries for ``index``; refuses one that differs from the index's."""
    built = index.encoder
    run = run or built.get("run", "")
    if not run:
        raise ValueError(f"index {index.path} names no run; give --run RUN_DIR")
    dtype = DTYPES[index.manifest["config"].get("dtype", "float32")]
    encoder = TextEncoder.from_run(run, None, built.get("pooling", "mean"), device, dtype)
    assert encoder.identity is not None
    problem = encoder.identity.mismatch(built)
    if problem:
        raise ValueError(f"index {index.path} was built with another model or tokenizer than run {run}: {problem}; "
                         "search with the run that built it or rebuild the index with `pilelm embed`")
    return encoder


def format_hits(hits: list[Hit], as_json: bool, chars: int, header: str) -> str:
    if as_json:
        return json.dumps([h.to_json(chars) for h in hits], ensure_ascii=False, indent=2)
    lines = [header]
    for h in hits:
        lines.append(f"{h.rank:>3}. {h.score:.4f}  {h.id}  [{h.component}]  chunk {h.chunk}")
        lines.append(f"     {h.snippet(chars)}")
    return "\n".join(lines)


def run_search(cfg: SearchConfig) -> str:
    if not cfg.index or not cfg.query:
        raise ValueError('search needs an index and a query: pilelm search INDEX_DIR "query" [-k 10]')
    index = VectorIndex(cfg.index)
    encoder = None if cfg.mode == "bm25" else open_encoder_for(index, cfg.run, cfg.device)
    hits = HybridSearcher(index).search(cfg.query, cfg.k, cfg.mode, encoder, dense_weight=cfg.dense_weight)
    return format_hits(hits, cfg.json, cfg.snippet_chars,
                       f"top {len(hits)} of {len(index)} documents for {cfg.query!r} ({cfg.mode})")


def run_similar(cfg: SimilarConfig) -> str:
    if not cfg.index or not cfg.doc:
        raise ValueError("similar needs an index and a document: pilelm similar INDEX_DIR --doc ID")
    index = VectorIndex(cfg.index)
    row = index.doc_row(cfg.doc)
    hits = index.search(index.doc_vector(row), cfg.k, exclude=row)
    return format_hits(hits, cfg.json, cfg.snippet_chars,
                       f"top {len(hits)} documents like {index.docs[row]['id']} [{index.docs[row]['component']}]")

