"""Topic coherence: NPMI of each topic's top words over the corpus, and an LDA to compare with.

A topic is coherent when its words occur together in documents. NPMI (Bouma 2009, normalised
PMI; as a topic score: Lau, Newman & Baldwin 2014, Röder et al. 2015's C_NPMI) of two words
with document frequencies p(a), p(b) and co-occurrence p(a, b):

    NPMI(a, b) = log(p(a, b) / (p(a) p(b))) / -log p(a, b)     in [-1, 1]; -1 when never together

A topic scores the mean over its word pairs; a model the mean over its topics. Documents are
the index's documents, words as ``pilelm topics`` reads them (lower-cased runs of 3+ letters,
English stop words out), so both models are scored on the same vocabulary.

``lda_topics`` fits scikit-learn's LDA (online variational Bayes, Hoffman et al. 2010) with the
same number of topics on the same documents: the classical topic model a user would reach for.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from pilelm.retrieval.index import CHUNKS
from pilelm.retrieval.topics import _WORD, stop_words


def document_words(index_dir: Path, n_docs: int) -> list[list[str]]:
    """Each document's words (all its chunks), as ``pilelm topics`` counts them."""
    stops = stop_words()
    docs: list[list[str]] = [[] for _ in range(n_docs)]
    with open(index_dir / CHUNKS, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            docs[rec["doc"]] += [w for w in _WORD.findall(rec["text"].lower()) if w not in stops]
    return docs


def npmi_coherence(topics: list[list[str]], documents: list[set[str]]) -> list[float]:
    """Mean pairwise NPMI of each topic's words over ``documents`` (sets of words)."""
    n = len(documents)
    if n == 0:
        raise ValueError("NPMI needs documents")
    vocab = {w for t in topics for w in t}
    df = {w: sum(w in d for d in documents) for w in vocab}
    out = []
    for words in topics:
        scores = []
        for a, b in itertools.combinations(words, 2):
            joint = sum(a in d and b in d for d in documents) / n
            if joint == 0:
                scores.append(-1.0)
            elif joint == 1:
                scores.append(1.0)  # in every document: log p(a, b) = 0, perfectly associated
            else:
                pmi = math.log(joint / ((df[a] / n) * (df[b] / n)))
                scores.append(pmi / -math.log(joint))
        out.append(float(np.mean(scores)) if scores else 0.0)
    return out


def lda_topics(documents: list[list[str]], k: int, terms: int, seed: int = 0) -> list[list[str]]:
    """The ``terms`` most probable words of each of ``k`` LDA topics (scikit-learn)."""
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(analyzer=lambda words: words, min_df=2)
    counts = vectorizer.fit_transform(documents)
    lda = LatentDirichletAllocation(n_components=k, random_state=seed, learning_method="batch", max_iter=20)
    lda.fit(counts)
    vocab = vectorizer.get_feature_names_out()
    return [[str(vocab[i]) for i in np.argsort(-row)[:terms]] for row in lda.components_]
