"""The (query, positive) pairs one document gives, with no labels: a StackExchange question and
its answer (``qa``), a title and its body (``title``), two random spans (``crop``). See
``pair_mining`` for the references; ``pilelm mine-pairs`` writes them for training and
``hybrid.calibrate_fusion`` scores a fusion weight on them.
"""

from __future__ import annotations

import numpy as np

from pilelm.evaluation.retrieval import STACKEXCHANGE, qa_pair

KINDS = ("qa", "title", "crop")
MIN_CHARS = 32  # a query or positive shorter than this carries too little to learn from
TITLE_CHARS = 100  # a first line longer than this is a sentence, not a title


def title_pair(text: str) -> tuple[str, str] | None:
    """(title, body) when the first line is short and the rest is long enough, else None."""
    head, sep, body = text.strip().partition("\n")
    head, body = head.strip(), body.strip()
    if not sep or not head or len(head) > TITLE_CHARS or len(body) < MIN_CHARS:
        return None
    if head.endswith((".", ",", ";", "{", "(", ":")) or len(head.split()) > 16:
        return None  # a sentence or code, not a title
    return head, body


def random_crop(words: list[str], rng: np.random.Generator, max_words: int) -> str:
    """A span of 10-50 % of ``words`` (at most ``max_words``) at a random place."""
    n = len(words)
    length = max(1, min(max_words, int(n * rng.uniform(0.1, 0.5))))
    start = int(rng.integers(0, n - length + 1))
    return " ".join(words[start : start + length])


def crop_pairs(text: str, rng: np.random.Generator, count: int, max_words: int) -> list[tuple[str, str]]:
    words = text.split()
    if len(words) < 20:
        return []
    pairs = []
    for _ in range(count):
        q, p = random_crop(words, rng, max_words), random_crop(words, rng, max_words)
        if len(q) >= MIN_CHARS and len(p) >= MIN_CHARS:
            pairs.append((q, p))
    return pairs


def mine_document(text: str, component: str, kinds: list[str], rng: np.random.Generator,
                  crops: int = 1, crop_words: int = 64) -> list[tuple[str, str, str]]:
    """(query, positive, kind) pairs of one document."""
    out: list[tuple[str, str, str]] = []
    if "qa" in kinds and component == STACKEXCHANGE and (qa := qa_pair(text)) is not None:
        out.append((*qa, "qa"))
    elif "title" in kinds and (tb := title_pair(text)) is not None:
        out.append((*tb, "title"))
    if "crop" in kinds:
        out += [(q, p, "crop") for q, p in crop_pairs(text, rng, crops, crop_words)]
    return out
