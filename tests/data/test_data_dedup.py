"""Dedup: words/shingles against a plain-Python reference, MinHash bit-exact against
datasketch, LSH candidates against datasketch's LSH, and planted near-duplicates."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from pilelm.data.dedup import (
    DedupConfig,
    band_keys,
    document_keys,
    find_duplicates,
    minhash,
    permutations,
    shingle_hashes,
    union,
)
from pilelm.data.words import tokenize

M64 = (1 << 64) - 1
MULT = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _ref_words(text: str) -> list[int]:
    """The word hashes of pilelm.data.words, one word at a time in plain Python."""
    out = []
    for m in re.finditer(rb"[A-Za-z0-9\x80-\xff]+", text.encode()):
        h, p = 0, 1
        for c in m.group():
            h = (h + ((c + 32 if 65 <= c <= 90 else c) + 1) * p) & M64
            p = (p * MULT) & M64
        out.append(_mix64(h ^ ((len(m.group()) << 56) & M64)))
    return out


def _ref_shingles(text: str, n: int) -> list[int]:
    ws = _ref_words(text)
    spans = [ws[i: i + n] for i in range(len(ws) - n + 1)] if len(ws) >= n else ([ws] if ws else [])
    out = []
    for span in spans:
        acc = 0
        for w in span:
            acc = (acc * MULT + w) & M64
        out.append(_mix64(acc) >> 32)
    return out


def _corpus(seed: int = 0, n_base: int = 200, n_near: int = 80, n_related: int = 40):
    """Random-word documents; planted near-duplicates (~2% of words edited, Jaccard of
    5-gram shingles >= 0.8) and related documents (a shared half, Jaccard ~0.3)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]

    def doc(k: int) -> list[str]:
        return [rng.choice(vocab) for _ in range(k)]

    texts = [" ".join(doc(rng.randint(150, 400))) for _ in range(n_base)]
    for i in rng.sample(range(n_base), n_near):
        ws = texts[i].split()
        for _ in range(max(1, len(ws) // 60)):
            j = rng.randrange(len(ws))
            ws[j] = rng.choice(vocab)
        texts.append(" ".join(ws).upper() if rng.random() < 0.3 else ", ".join(ws))  # case/punct vary
    for i in rng.sample(range(n_base), n_related):
        ws = texts[i].split()
        texts.append(" ".join(ws[: len(ws) // 2] + doc(len(ws) // 2)))
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order]


def _jaccard(a: set, b: set) -> float:
    inter = len(a & b)
    return inter / max(1, len(a) + len(b) - inter)


def test_words_and_shingles_match_reference() -> None:
    texts = ["Hello, World! Don't stop: x2 über-cool.", "", "!!!", "a b", "The SAME the same words " * 20]
    words = tokenize([t.encode() for t in texts])
    for d, t in enumerate(texts):
        assert words.hashes[words.bounds[d]: words.bounds[d + 1]].tolist() == _ref_words(t)
    sh, doc = shingle_hashes(words, 5)
    for d, t in enumerate(texts):
        assert sh[doc == d].tolist() == _ref_shingles(t, 5)


def test_minhash_is_bit_exact_with_datasketch_and_lsh_agrees() -> None:
    texts = _corpus(1, n_base=40, n_near=20, n_related=10)
    cfg = DedupConfig()
    a, b = permutations(cfg.num_perm, cfg.seed)
    words = tokenize([t.encode() for t in texts])
    sh, doc = shingle_hashes(words, cfg.ngram)
    sig = minhash(sh, doc, len(texts), a, b, chunk=256)  # small chunks: documents span chunks
    lsh = MinHashLSH(threshold=0.5, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    for i, t in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, hashfunc=lambda x: x, permutations=(a, b), scheme="affine32")
        m.update_batch(_ref_shingles(t, cfg.ngram))
        assert np.array_equal(m.hashvalues, sig[i]), i
        lsh.insert(i, m)
    ours = set()
    keys = band_keys(sig, cfg.bands, cfg.rows)
    for band in keys:
        for k in np.unique(band):
            members = np.flatnonzero(band == k)
            ours |= {(int(x), int(y)) for x in members for y in members if x < y}
    theirs = set()
    for i in range(len(texts)):
        m = MinHash(num_perm=cfg.num_perm, hashvalues=sig[i], scheme="affine32")
        theirs |= {(min(i, j), max(i, j)) for j in lsh.query(m) if j != i}
    assert theirs and ours == theirs


def test_planted_near_duplicates_precision_and_recall(tmp_path: Path) -> None:
    texts = _corpus(0)
    shingle_sets = [set(_ref_shingles(t, 5)) for t in texts]
    truth = {j for j in range(len(texts)) if any(_jaccard(shingle_sets[i], shingle_sets[j]) >= 0.8 for i in range(j))}
    related = sum(1 for j in range(len(texts)) for i in range(j) if 0.2 < _jaccard(shingle_sets[i], shingle_sets[j]) < 0.6)
    assert len(truth) >= 70 and related >= 30  # the corpus really has both kinds
    cfg = DedupConfig()
    perms = permutations(cfg.num_perm, cfg.seed)
    # keys written by two "tasks", as the pipeline does
    files = []
    for part, chunk in enumerate((texts[:150], texts[150:])):
        enc = [t.encode() for t in chunk]
        exact, bands = document_keys(tokenize(enc), enc, cfg, perms)
        files.append(tmp_path / f"{part}.npz")
        np.savez(files[-1], exact=exact, bands=bands)
    res = find_duplicates(files, cfg)
    found = set(np.flatnonzero(res.reason > 0).tolist())
    precision = len(found & truth) / max(1, len(found))
    recall = len(found & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    for j in found:  # every dropped document points at an earlier, kept one that it resembles
        r = int(res.representative[j])
        assert r < j and res.reason[r] == 0
        assert _jaccard(shingle_sets[r], shingle_sets[j]) > 0.5


def test_exact_duplicates_ignore_case_and_punctuation(tmp_path: Path) -> None:
    texts = ["One two three, four.", "one TWO three four", "one two three four five", "One two three, four."]
    cfg = DedupConfig(minhash=False)
    enc = [t.encode() for t in texts]
    exact, bands = document_keys(tokenize(enc), enc, cfg, permutations(cfg.num_perm, 1))
    np.savez(tmp_path / "k.npz", exact=exact, bands=bands)
    res = find_duplicates([tmp_path / "k.npz"], cfg)
    assert res.reason.tolist() == [0, 1, 0, 1]
    assert res.representative.tolist() == [0, 0, 2, 0]


def test_vectorised_union_find_matches_connected_components() -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n = 2000
    a = rng.integers(0, n, 1500)
    b = rng.integers(0, n, 1500)
    parent = np.arange(n, dtype=np.int32)
    for lo in range(0, 1500, 300):  # in several batches, as bands arrive
        union(parent, a[lo: lo + 300], b[lo: lo + 300])
    while not np.array_equal(parent[parent], parent):
        parent = parent[parent]
    _, labels = connected_components(coo_matrix((np.ones(1500), (a, b)), shape=(n, n)), directed=False)
    for comp in np.unique(labels):
        members = np.flatnonzero(labels == comp)
        assert (parent[members] == members.min()).all()
