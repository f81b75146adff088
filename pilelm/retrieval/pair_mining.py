"""``pilelm mine-pairs CORPUS -o PAIRS.jsonl``: training pairs for a retriever from a user's own
documents, each with a BM25-mined hard negative, for ``pilelm finetune-contrastive --pairs``.

Three kinds of (query, positive) pair, none needing labels:

- ``qa``: a StackExchange thread's question and its first answer (the Pile's ``Q:``/``A:`` layout);
- ``title``: a document whose first line is a short title (an encyclopedia entry, a man page, a
  FAQ heading) and its body, as title/body pairs pretrain E5 (Wang et al. 2022, "Text
  Embeddings by Weakly-Supervised Contrastive Pre-training", sec. 3.1);
- ``crop``: two independent random word spans of one document, each 10-50 % of it (Contriever,
  Izacard et al. 2022, "Unsupervised Dense Information Retrieval with Contrastive Learning",
  sec. 3.2: independent cropping), capped at ``crop_words`` words.

Hard negatives (DPR, Karpukhin et al. 2020, sec. 3.2: "the top passage returned by BM25 which
does not contain the answer"): each query is scored by BM25 against every pair's positive, and
the best-scoring positive from another document becomes its ``negative``. A hard negative is
what BM25 confuses with the answer, so the dense side learns what BM25 cannot tell apart: that
is the part a hybrid of the two gains from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_write_text
from pilelm.evaluation.retrieval import bm25_query_scores, bm25_retriever, bm25_words
from pilelm.retrieval.embed import iter_corpus
from pilelm.retrieval.pair_kinds import KINDS, mine_document

log = logging.getLogger(__name__)



@dataclass
class MinePairsConfig:
    corpus: list[str] = field(default_factory=list)
    """A prepared dir (pilelm prepare output) or document files, folders and globs."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits of a prepared dir to mine (keep test out: eval --task retrieval reads it)."""
    output: str = ""
    """JSONL file of {"query", "positive", "negative", "kind"} to write (-o)."""
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    """Pair kinds: qa (question -> answer), title (title -> body), crop (two random spans of a document)."""
    crops_per_doc: int = 1
    """Crop pairs per document."""
    crop_words: int = 64
    """Most words in a crop (Contriever's 10-50 % of the document, capped here)."""
    hard_negatives: bool = True
    """Add each query's best BM25 match among the other documents' positives as its negative."""
    max_documents: int = 0
    """Mine only the first N documents (0 = all)."""
    seed: int = 0
    """Seed of the crops."""

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds: {bad or 'none given'}; use some of {', '.join(KINDS)}")
        if self.crops_per_doc < 0 or self.max_documents < 0:
            raise ValueError("crops_per_doc and max_documents must be >= 0")
        if self.crop_words < 8:
            raise ValueError(f"crop_words must be >= 8, got {self.crop_words}")


def bm25_hard_negatives(queries: list[str], positives: list[str], owners: list[int]) -> list[int | None]:
    """For each query, the index of the best BM25-scoring positive of another document (None when
    no other document's positive shares a word with it)."""
    retriever = bm25_retriever(positives)
    owner_of = np.asarray(owners)
    negatives: list[int | None] = []
    for words, owner in zip(bm25_words(queries), owners, strict=True):
        scores = bm25_query_scores(retriever, words)
        scores[owner_of == owner] = 0.0  # the document's own positives are not negatives
        best = int(scores.argmax())
        negatives.append(best if scores[best] > 0 else None)
    return negatives


def run_mine_pairs(cfg: MinePairsConfig) -> Path:
    if not cfg.corpus or not cfg.output:
        raise ValueError("mine-pairs needs a corpus and an output: pilelm mine-pairs PREPARED_DIR -o PAIRS.jsonl")
    rng = np.random.default_rng(cfg.seed)
    rows: list[tuple[str, str, str]] = []
    owners: list[int] = []
    docs = 0
    for i, doc in enumerate(iter_corpus(cfg.corpus, cfg.splits)):
        if cfg.max_documents and i >= cfg.max_documents:
            break
        docs += 1
        for pair in mine_document(doc.text, doc.component, cfg.kinds, rng, cfg.crops_per_doc, cfg.crop_words):
            rows.append(pair)
            owners.append(i)
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} pairs mined from {docs} documents of {cfg.corpus}; contrastive training needs "
                         "at least 2: give more documents or add kinds (--kinds qa --kinds title --kinds crop)")
    negatives = (bm25_hard_negatives([q for q, _, _ in rows], [p for _, p, _ in rows], owners)
                 if cfg.hard_negatives else [None] * len(rows))
    lines = []
    for (q, p, kind), n in zip(rows, negatives, strict=True):
        rec = {"query": q, "positive": p, "kind": kind}
        if n is not None:
            rec["negative"] = rows[n][1]
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(lines))
    counts = {k: sum(r[2] == k for r in rows) for k in cfg.kinds}
    log.info("mined %d pairs from %d documents (%s), %d with a hard negative, into %s", len(rows), docs,
             ", ".join(f"{k} {v}" for k, v in counts.items()), sum(n is not None for n in negatives), out)
    return out
