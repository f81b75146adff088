"""Words and word n-grams of many documents at once, hashed with numpy (no per-word Python).

A word is a maximal run of ASCII letters/digits or non-ASCII bytes in the UTF-8 text, case-
folded for ASCII: ``"Don't stop!"`` has the words ``don``, ``t``, ``stop``. Punctuation and
whitespace separate words, so hashes ignore formatting, as MinHash dedup (Lee et al. 2022)
and the GPT-3 13-gram overlap test (Brown et al. 2020, App. C) want. Word offsets are byte
offsets into each document's UTF-8 encoding; a word never straddles a UTF-8 character.

Hashes: a polynomial hash of each word's bytes mod 2**64 computed from a prefix sum (so the
cost is a few vector operations per byte), finished with the splitmix64 mixer (Steele et
al. 2014); n-grams combine word hashes the same way. Documents are processed in segments of
at most ``SEGMENT`` bytes, so memory stays bounded for any document size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEGMENT = 1 << 20

WORD_BYTE = np.zeros(256, dtype=bool)
for _lo, _hi in ((48, 57), (65, 90), (97, 122), (128, 255)):
    WORD_BYTE[_lo:_hi + 1] = True
_FOLD = np.arange(256, dtype=np.uint64)
_FOLD[65:91] += 32  # ASCII A-Z -> a-z
_FOLD += 1  # so that no byte hashes as zero

_MULT = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_MULT_INV = pow(_MULT, -1, 1 << 64)
_POW: np.ndarray | None = None
_INV: np.ndarray | None = None


def _powers() -> tuple[np.ndarray, np.ndarray]:
    global _POW, _INV
    if _POW is None:
        with np.errstate(over="ignore"):
            pw = np.full(SEGMENT + 2, _MULT, dtype=np.uint64)
            pw[0] = 1
            _POW = np.cumprod(pw, dtype=np.uint64)
            iv = np.full(SEGMENT + 2, _MULT_INV, dtype=np.uint64)
            iv[0] = 1
            _INV = np.cumprod(iv, dtype=np.uint64)
    assert _INV is not None
    return _POW, _INV


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised: a bijection of uint64 that spreads every bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@dataclass
class Words:
    """The words of a batch of documents."""

    hashes: np.ndarray
    """(W,) uint64 hash of each word."""
    starts: np.ndarray
    """(W,) int64 byte offset of each word in its document."""
    ends: np.ndarray
    """(W,) int64 byte offset just past each word."""
    bounds: np.ndarray
    """(D+1,) int64: the words of document d are ``[bounds[d], bounds[d+1])``."""

    def doc(self, d: int) -> Words:
        a, b = int(self.bounds[d]), int(self.bounds[d + 1])
        return Words(self.hashes[a:b], self.starts[a:b], self.ends[a:b], np.array([0, b - a]))


def _segments(docs: Sequence[bytes]) -> list[list[tuple[int, int, int]]]:
    """Group (doc, start, end) pieces into segments of at most SEGMENT bytes; a longer
    document is cut at a non-word byte so no word is split (unless it is itself huge)."""
    segs: list[list[tuple[int, int, int]]] = [[]]
    size = 0
    for d, data in enumerate(docs):
        n = len(data)
        pos = 0
        while pos < n or (n == 0 and pos == 0):
            take = min(n - pos, SEGMENT)
            if pos + take < n:
                window = np.frombuffer(data, dtype=np.uint8, count=min(take, 4096), offset=pos + take - min(take, 4096))
                sep = np.flatnonzero(~WORD_BYTE[window])
                if len(sep):
                    take = take - len(window) + int(sep[-1]) + 1
            if size + take + 1 > SEGMENT and segs[-1]:
                segs.append([])
                size = 0
            segs[-1].append((d, pos, pos + take))
            size += take + 1
            pos += take
            if n == 0:
                break
    return segs


def tokenize(docs: Sequence[bytes]) -> Words:
    """Words of each UTF-8 document in ``docs`` (see the module docstring)."""
    pw, iv = _powers()
    hashes, starts, ends, owners = [], [], [], []
    for seg in _segments(docs):
        pieces = [docs[d][a:b] for d, a, b in seg]
        buf = np.frombuffer(b"\n".join(pieces), dtype=np.uint8)
        if buf.size == 0:
            continue
        is_word = WORD_BYTE[buf].view(np.int8)
        edges = np.diff(is_word, prepend=np.int8(0), append=np.int8(0))
        s = np.flatnonzero(edges == 1)
        e = np.flatnonzero(edges == -1)
        if s.size == 0:
            continue
        with np.errstate(over="ignore"):
            pre = np.zeros(buf.size + 1, dtype=np.uint64)
            np.cumsum(_FOLD[buf] * pw[: buf.size], out=pre[1:])
            h = (pre[e] - pre[s]) * iv[s]
            h ^= (e - s).astype(np.uint64) << np.uint64(56)
            hashes.append(mix64(h))
        # map segment offsets back to (document, offset in document)
        lens = np.array([b - a for _, a, b in seg], dtype=np.int64)
        seg_starts = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))
        piece = np.searchsorted(seg_starts, s, side="right") - 1
        doc_ids = np.array([d for d, _, _ in seg], dtype=np.int64)
        doc_off = np.array([a for _, a, _ in seg], dtype=np.int64)
        shift = doc_off[piece] - seg_starts[piece]
        starts.append(s + shift)
        ends.append(e + shift)
        owners.append(doc_ids[piece])
    if not hashes:
        z = np.zeros(0, dtype=np.int64)
        return Words(np.zeros(0, dtype=np.uint64), z, z, np.zeros(len(docs) + 1, dtype=np.int64))
    owner = np.concatenate(owners)
    bounds = np.searchsorted(owner, np.arange(len(docs) + 1), side="left").astype(np.int64)
    return Words(np.concatenate(hashes), np.concatenate(starts), np.concatenate(ends), bounds)


def ngrams(words: Words, n: int, short: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashes of every word n-gram that does not cross a document.

    Returns ``(hashes, doc, first_word)``, sorted by document. With ``short``, a document
    with 1..n-1 words gives one n-gram of all its words (so it still has a fingerprint).
    """
    h = words.hashes
    bounds = words.bounds
    counts = np.diff(bounds)
    doc_of_word = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    out_h, out_d, out_f = [], [], []
    if h.size >= n:
        m = h.size - n + 1
        with np.errstate(over="ignore"):
            acc = h[:m].copy()
            for k in range(1, n):
                acc *= np.uint64(_MULT)
                acc += h[k: k + m]
        first = np.arange(m, dtype=np.int64)
        valid = first + n <= bounds[doc_of_word[:m] + 1]
        out_h.append(mix64(acc[valid]))
        out_d.append(doc_of_word[:m][valid])
        out_f.append(first[valid])
    if short:
        few = np.flatnonzero((counts > 0) & (counts < n))
        if few.size:
            hs = np.empty(few.size, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for i, d in enumerate(few):
                    acc1 = np.uint64(0)
                    for x in h[bounds[d]: bounds[d + 1]]:
                        acc1 = acc1 * np.uint64(_MULT) + x
                    hs[i] = acc1
            out_h.append(mix64(hs))
            out_d.append(few.astype(np.int64))
            out_f.append(bounds[few])
    if not out_h:
        z = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), z, z
    hh, dd, ff = np.concatenate(out_h), np.concatenate(out_d), np.concatenate(out_f)
    if len(out_h) > 1:
        order = np.argsort(dd, kind="stable")
        hh, dd, ff = hh[order], dd[order], ff[order]
    return hh, dd, ff
