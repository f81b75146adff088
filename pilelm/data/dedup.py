"""Exact and near-duplicate (MinHash-LSH) detection as resumable on-disk stages.

Stage 1 (per task, in ``pipeline``): every kept document gets an exact key (BLAKE2b-128 of
its word sequence: case, punctuation and whitespace do not matter) and a MinHash signature
over its word n-gram shingles (Broder 1997), cut into ``bands`` x ``rows`` band keys (the
LSH banding of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.4). These
are written next to the task's documents.

Stage 2 (``find_duplicates``, per split; train-vs-eval overlap is decontamination's job): documents with equal exact keys, or equal keys in
any band, are linked; the connected components are clusters and all but the first document
(in canonical order) of each cluster are dropped. Links are merged band by band into a
vectorised union-find, so memory is one integer per document plus one band column at a time.

The signature is bit-for-bit the one ``datasketch.MinHash`` (2.x, its default "affine32"
scheme) computes from the same 32-bit shingle hashes and permutations: each shingle hash h
is mixed once with the MurmurHash3 finaliser, then permutation i maps it to
``(a_i * fmix32(h) + b_i) mod 2**32`` with odd ``a_i`` (a bijection). So datasketch serves as
the test oracle; the uint32 arithmetic runs 16 lanes wide in numpy.

Defaults: 5-word shingles, 14 bands x 8 rows = 112 permutations. A pair with Jaccard
similarity s becomes a candidate with probability ``1 - (1 - s**8)**14``: 0.5% at s=0.5,
21% at 0.6, 66% at 0.7, 92% at 0.75, 99.2% at 0.8, 100% at 0.9; the threshold
``(1/14)**(1/8)`` is 0.72.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pilelm.data.words import Words, mix64, ngrams

MAX_HASH32 = np.uint32((1 << 32) - 1)
EMPTY_BAND = np.uint64(0)
"""Band key of a document without words (such documents are never linked)."""


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose word sequence (case, punctuation, spacing ignored) equals an
    earlier one's."""
    minhash: bool = True
    """Drop near-duplicates found by MinHash-LSH."""
    ngram: int = 5
    """Words per shingle."""
    bands: int = 14
    """LSH bands; with `rows` sets the similarity threshold ~(1/bands)**(1/rows)."""
    rows: int = 8
    """MinHash values per band (bands * rows permutations in all)."""
    seed: int = 1
    """Seed of the MinHash permutations."""
    max_memory_mb: int = 1024
    """Memory for one band column in the cluster stage; more documents are done in passes."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError("dedup.ngram must be >= 1")
        if self.bands < 1 or self.rows < 1:
            raise ValueError("dedup.bands and dedup.rows must be >= 1")
        if self.max_memory_mb < 16:
            raise ValueError("dedup.max_memory_mb must be >= 16")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def threshold(self) -> float:
        return (1 / self.bands) ** (1 / self.rows)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) uint32 of the affine permutations; every a is odd."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (Appleby 2011), as datasketch applies it."""
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingle_hashes(words: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (uint32) of the n-word shingles of each document, and their doc."""
    h, doc, _ = ngrams(words, n)
    return (h >> np.uint64(32)).astype(np.uint32), doc


def minhash(shingles: np.ndarray, doc: np.ndarray, n_docs: int, a: np.ndarray, b: np.ndarray,
            chunk: int = 4096) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures; ``doc`` must be sorted. A document with
    no shingle keeps all values at 2**32 - 1 (datasketch's empty signature)."""
    k = a.size
    sig = np.full((n_docs, k), MAX_HASH32, dtype=np.uint32)
    buf = np.empty((chunk, k), dtype=np.uint32)
    mixed = fmix32(shingles)
    for c0 in range(0, mixed.size, chunk):
        hv = mixed[c0: c0 + chunk]
        x = buf[: hv.size]
        np.multiply(hv[:, None], a[None, :], out=x)  # wraps mod 2**32
        x += b
        d = doc[c0: c0 + chunk]
        first = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
        mins = np.minimum.reduceat(x, first, axis=0)
        rows = d[first]
        sig[rows] = np.minimum(sig[rows], mins)
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, n_docs) uint64 keys: equal keys <=> equal rows of that band (up to 2**-64)."""
    n = sig.shape[0]
    v = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = np.zeros((n, bands), dtype=np.uint64)
        for r in range(rows):
            acc = mix64(acc ^ v[:, :, r]) + np.uint64(r + 1)
        acc = mix64(acc + np.arange(bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15))
    acc[acc == EMPTY_BAND] = np.uint64(1)  # 0 marks "no key" (documents without words)
    return np.ascontiguousarray(acc.T)


def exact_keys(words: Words, texts: list[bytes]) -> np.ndarray:
    """(n_docs, 2) uint64 BLAKE2b-128 of each document's word hashes (of its bytes when it
    has no word)."""
    out = np.empty((len(texts), 2), dtype=np.uint64)
    for d, raw in enumerate(texts):
        a, b = words.bounds[d], words.bounds[d + 1]
        data = words.hashes[a:b].tobytes() if b > a else b"\x00" + raw
        out[d] = np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint64)
    return out


def document_keys(words: Words, texts: list[bytes], cfg: DedupConfig,
                  perms: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact keys (n, 2) and band keys (bands, n) of a batch (band key 0 = no shingle)."""
    exact = exact_keys(words, texts)
    n = len(texts)
    if not cfg.minhash:
        return exact, np.zeros((0, n), dtype=np.uint64)
    sh, doc = shingle_hashes(words, cfg.ngram)
    sig = minhash(sh, doc, n, *perms)
    bands = band_keys(sig, cfg.bands, cfg.rows)
    bands[:, np.diff(words.bounds) == 0] = EMPTY_BAND
    return exact, bands


# ---------------------------------------------------------------- cluster stage


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Link the pairs (a[i], b[i]) in the union-find ``parent``; a root is always the smallest
    index of its set, so the first document of a cluster is its representative."""
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        keep = ra != rb
        ra, rb = ra[keep], rb[keep]
        if not ra.size:
            return
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi


def flatten(parent: np.ndarray) -> np.ndarray:
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt


def _pairs_of_equal(keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of equal keys, pair every member with the run's first (smallest) index."""
    order = np.lexsort((index, keys))
    k, idx = keys[order], index[order]
    new_run = np.concatenate(([True], k[1:] != k[:-1]))
    run_id = np.cumsum(new_run) - 1
    head = idx[new_run][run_id]
    dup = ~new_run
    return head[dup], idx[dup]


@dataclass
class DedupResult:
    reason: np.ndarray
    """(n,) uint8 per document: 0 kept, 1 exact duplicate, 2 near duplicate."""
    representative: np.ndarray
    """(n,) int64: the kept document each dropped one duplicates (itself when kept)."""


def find_duplicates(feature_files: list[Path], cfg: DedupConfig) -> DedupResult:
    """Cluster the documents of ``feature_files`` (``.npz`` with ``exact`` and ``bands``, in
    canonical order) and choose which to drop."""
    counts = []
    for f in feature_files:
        with np.load(f) as z:
            counts.append(int(z["exact"].shape[0]))
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    n = int(offsets[-1])
    reason = np.zeros(n, dtype=np.uint8)
    idx_dtype = np.int32 if n < 2**31 - 1 else np.int64
    parent = np.arange(n, dtype=idx_dtype)
    if n == 0:
        return DedupResult(reason, parent.astype(np.int64))

    def column(load) -> np.ndarray:
        parts = []
        for f in feature_files:
            with np.load(f) as z:
                parts.append(load(z))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    index = np.arange(n, dtype=idx_dtype)
    if cfg.exact:
        ex = column(lambda z: z["exact"])
        # Two uint64 halves: sort on both by folding the second into a combined key order.
        order = np.lexsort((index, ex[:, 1], ex[:, 0]))
        e0, e1 = ex[order, 0], ex[order, 1]
        same = np.concatenate(([False], (e0[1:] == e0[:-1]) & (e1[1:] == e1[:-1])))
        run_id = np.cumsum(~same) - 1
        head = index[order][~same][run_id]
        a, b = head[same], index[order][same]
        union(parent, a, b)
        reason[b] = 1
        del ex
    if cfg.minhash:
        alive = reason == 0
        per_pass = max(1, (cfg.max_memory_mb << 20) // 24)  # key + index + sort order per doc
        for band in range(cfg.bands):
            keys = column(lambda z, band=band: z["bands"][band])
            ok = alive & (keys != EMPTY_BAND)
            for lo in range(0, 1 if n <= per_pass else 1 << 8, 1):
                # Many documents: take one key range (top 8 bits) per pass.
                sel = ok if n <= per_pass else ok & ((keys >> np.uint64(56)) == lo)
                a, b = _pairs_of_equal(keys[sel], index[sel])
                union(parent, a, b)
    rep = flatten(parent).astype(np.int64)
    near = (rep != np.arange(n)) & (reason == 0)
    reason[near] = 2
    return DedupResult(reason, rep)
