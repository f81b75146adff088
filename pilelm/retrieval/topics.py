"""``pilelm topics INDEX -k 20``: cluster an index's documents and name the clusters.

A document's vector is the normalised mean of its chunks' vectors. Spherical k-means (faiss,
cosine on unit vectors) groups them; each cluster is named by its most distinctive words with
class-based TF-IDF (Grootendorst 2022, "BERTopic", eq. 1): all of a cluster's documents are
one class, and a word w weighs

    W(w, c) = tf(w, c) * log(1 + A / tf(w))

with tf(w, c) the word's share of the class's words, tf(w) its count over all classes and A
the mean number of words per class. Words are lower-cased runs of 3+ letters, English stop
words dropped.

Output (``-o TOPICS``): ``topics.json`` (per cluster: size, words, sizes per Pile component),
``topics.md`` (the table), ``topics.png`` (a 2-D map: the vectors' first two principal
components, coloured by cluster), ``assignments.jsonl`` (document id -> cluster), manifest.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pilelm.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from pilelm.core.config import require_at_least
from pilelm.core.manifest import Timer, clear_manifest, write_manifest
from pilelm.retrieval.index import CHUNKS, VectorIndex, import_faiss

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]{3,}")
MAP_POINTS = 20000  # points drawn on the 2-D map (a random sample beyond this)


@dataclass
class TopicsConfig:
    index: str = ""
    """Index directory (pilelm embed output)."""
    output: str = ""
    """Output folder (-o): topics.json, topics.md, topics.png, assignments.jsonl."""
    k: int = 20
    """Number of clusters (at most the number of documents)."""
    terms: int = 8
    """Words that name each cluster."""
    niter: int = 25
    """k-means iterations."""
    seed: int = 0
    """k-means seed."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("k", "terms", "niter"))


def document_vectors(index: VectorIndex) -> np.ndarray:
    """(docs, dim) normalised means of each document's chunk vectors."""
    starts = np.array([d["first_chunk"] for d in index.docs], dtype=np.int64)
    sums = np.add.reduceat(np.asarray(index.vectors, dtype=np.float32), starts, axis=0)
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def stop_words() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS)


def class_word_counts(index: VectorIndex, labels: np.ndarray, k: int) -> list[Counter[str]]:
    """Word counts of each cluster's text, read from chunks.jsonl in one pass."""
    stops = stop_words()
    counts: list[Counter[str]] = [Counter() for _ in range(k)]
    with open(index.path / CHUNKS, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            counts[int(labels[rec["doc"]])].update(w for w in _WORD.findall(rec["text"].lower()) if w not in stops)
    return counts


def c_tf_idf(counts: list[Counter[str]], top: int) -> list[list[tuple[str, float]]]:
    """The ``top`` words of each class by class-based TF-IDF."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    mean_words = sum(total.values()) / max(1, len(counts))
    out = []
    for c in counts:
        n = sum(c.values()) or 1
        scored = [(w, (m / n) * math.log(1 + mean_words / total[w])) for w, m in c.items()]
        out.append(sorted(scored, key=lambda x: (-x[1], x[0]))[:top])
    return out


def principal_plane(x: np.ndarray) -> np.ndarray:
    """(n, 2) coordinates on the first two principal components."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_map(xy: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=8, alpha=0.7)
    for c, name in enumerate(names):
        pts = xy[labels == c]
        if len(pts):
            ax.annotate(name, pts.mean(0), fontsize=7, ha="center", weight="bold")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title("documents by topic")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def topics_markdown(topics: list[dict[str, Any]], components: list[str]) -> str:
    lines = ["| topic | size | words | " + " | ".join(components) + " |",
             "|---:|---:|---|" + "---:|" * len(components)]
    for t in topics:
        words = ", ".join(w for w, _ in t["words"])
        lines.append(f"| {t['topic']} | {t['size']} | {words} | "
                     + " | ".join(str(t["components"].get(c, 0)) for c in components) + " |")
    return "\n".join(lines) + "\n"


def run_topics(cfg: TopicsConfig) -> Path:
    if not cfg.index or not cfg.output:
        raise ValueError("topics needs an index and an output: pilelm topics INDEX_DIR -k 20 -o TOPICS_DIR")
    faiss = import_faiss()
    out = Path(cfg.output)
    timer = Timer()
    index = VectorIndex(cfg.index)
    x = document_vectors(index)
    k = min(cfg.k, len(x))
    if k < cfg.k:
        log.warning("k=%d clusters asked for %d documents: using k=%d", cfg.k, len(x), k)
    with timer("kmeans"):
        km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, seed=cfg.seed, spherical=True,
                          min_points_per_centroid=1, verbose=False)
        km.train(x)
        labels = km.index.search(x, 1)[1][:, 0]
    with timer("words"):
        words = c_tf_idf(class_word_counts(index, labels, k), cfg.terms)
    components = sorted({d["component"] for d in index.docs})
    topics = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        comp = Counter(index.docs[i]["component"] for i in members)
        topics.append({"topic": c, "size": int(len(members)), "words": [(w, round(s, 6)) for w, s in words[c]],
                       "components": dict(comp.most_common())})
    topics.sort(key=lambda t: -t["size"])
    clear_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "topics.json", {"k": k, "documents": len(x), "topics": topics})
    atomic_write_text(out / "topics.md", topics_markdown(topics, components))
    atomic_write_text(out / "assignments.jsonl", "".join(
        json.dumps({"id": d["id"], "topic": int(labels[i])}, ensure_ascii=False) + "\n" for i, d in enumerate(index.docs)))
    with timer("map"):
        sample = np.random.default_rng(cfg.seed).permutation(len(x))[:MAP_POINTS]
        names = [" ".join(w for w, _ in words[c][:2]) for c in range(k)]
        plot_map(principal_plane(x[sample]), labels[sample], names, out / "topics.png")
    write_manifest(out, "topics", cfg, inputs=[cfg.index], counts={"documents": len(x), "topics": k},
                   timings=timer.timings)
    return out
