"""Decontamination: remove training text that overlaps evaluation text, with the parameters
of GPT-3 (Brown et al. 2020, App. C), also used for the Pile's eval-set analysis: any
13-gram shared with an evaluation document is cut out of the training document together
with 200 characters on each side; pieces under 200 characters are dropped too; a document
cut into more than 10 pieces is dropped entirely. As GPT-3 did, evaluation n-grams found in
more than 10 training documents are ignored: they are common phrases and legal or licence
boilerplate, text the model should learn, not leaked test text (``max_train_docs``).

The index holds the 13-gram hashes (``pilelm.data.words``: case and punctuation ignored) of
the evaluation documents, sorted and de-duplicated in a ``.npy`` file that is memory-mapped,
plus a bitmap of 16 bits per n-gram that answers most lookups (false-positive rate about
6%) before the binary search. It is built in hash partitions, so memory stays bounded.
Evaluation documents shorter than 13 words are not indexed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_path
from pilelm.data.words import Words, ngrams, tokenize


@dataclass
class DecontamConfig:
    enabled: bool = True
    """Cut evaluation text out of the train split."""
    against_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    """Splits of this run whose documents are the evaluation text."""
    eval_files: list[str] = field(default_factory=list)
    """More evaluation files, folders or globs (read like the inputs, with `reader.*`)."""
    ngram: int = 13
    """Words per n-gram (GPT-3: 13)."""
    margin_chars: int = 200
    """Characters removed on each side of an overlapping n-gram (GPT-3: 200)."""
    min_piece_chars: int = 200
    """Pieces shorter than this after cutting are dropped (GPT-3: 200)."""
    max_pieces: int = 10
    """A document cut into more pieces than this is dropped (GPT-3: 10)."""
    max_train_docs: int = 10
    """Ignore evaluation n-grams that occur in more training documents than this: common phrases, legal and licence boilerplate (GPT-3: 10); 0 = no limit."""

    def __post_init__(self) -> None:
        bad = [s for s in self.against_splits if s not in ("val", "test")]
        if bad:
            raise ValueError(f"decontam.against_splits: {bad}; use val and/or test")
        if self.ngram < 1 or self.margin_chars < 0 or self.min_piece_chars < 0 or self.max_pieces < 1:
            raise ValueError("decontam.ngram and decontam.max_pieces must be >= 1; margins >= 0")
        if self.max_train_docs < 0:
            raise ValueError(f"decontam.max_train_docs must be >= 0 (0 = no limit), got {self.max_train_docs}")


class NgramIndex:
    """Membership test for n-gram hashes: ``contains(hashes) -> bool array``.

    ``ignored.npy`` in the directory, when present, lists indexed n-grams that do not count
    (see ``frequent_ngrams``).
    """

    def __init__(self, directory: str | Path, use_ignored: bool = True) -> None:
        directory = Path(directory)
        self.hashes = np.load(directory / "ngrams.npy", mmap_mode="r")
        self.bitmap = np.load(directory / "bitmap.npy")
        self.mask = np.uint64(self.bitmap.size * 8 - 1)
        ignored = directory / IGNORED
        self.ignored = np.load(ignored) if use_ignored and ignored.is_file() else np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return int(self.hashes.size)

    def contains(self, h: np.ndarray) -> np.ndarray:
        if self.hashes.size == 0 or h.size == 0:
            return np.zeros(h.shape, dtype=bool)
        bit = h & self.mask
        maybe = (self.bitmap[bit >> np.uint64(3)] >> (bit & np.uint64(7)).astype(np.uint8)) & 1
        out = np.zeros(h.shape, dtype=bool)
        cand = np.flatnonzero(maybe)
        if cand.size:
            hc = h[cand]
            pos = np.searchsorted(self.hashes, hc)
            pos[pos == self.hashes.size] = 0
            out[cand] = np.asarray(self.hashes[pos]) == hc
        if self.ignored.size and out.any():
            hit = np.flatnonzero(out)
            pos = np.searchsorted(self.ignored, h[hit])
            pos[pos == self.ignored.size] = 0
            out[hit[self.ignored[pos] == h[hit]]] = False
        return out


IGNORED = "ignored.npy"


def matched_ngrams(texts: list[str], index: NgramIndex, n: int) -> np.ndarray:
    """The indexed n-grams each text contains, once per text (concatenated hashes)."""
    if len(index) == 0 or not texts:
        return np.zeros(0, dtype=np.uint64)
    h, doc, _ = ngrams(tokenize([t.encode("utf-8") for t in texts]), n, short=False)
    hit = index.contains(h)
    pairs = np.unique(np.stack([doc[hit].astype(np.uint64), h[hit]], axis=1), axis=0)
    return pairs[:, 1].copy()


def frequent_ngrams(matches: Iterable[np.ndarray], max_docs: int) -> np.ndarray:
    """Sorted n-gram hashes that occur in more than ``max_docs`` documents, from the per-batch
    outputs of ``matched_ngrams`` (each hash at most once per document)."""
    parts = [m for m in matches if m.size]
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    values, counts = np.unique(np.concatenate(parts), return_counts=True)
    return values[counts > max_docs]


def build_index(texts: Iterable[str], directory: str | Path, n: int = 13,
                batch_bytes: int = 8 << 20, partitions: int = 16) -> int:
    """Write the n-gram index of ``texts`` into ``directory``; returns the number of n-grams."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shift = np.uint64(64 - (partitions - 1).bit_length())
    files = [open(directory / f"part{p:02d}.tmp", "wb") for p in range(partitions)]

    def flush(batch: list[bytes]) -> None:
        h, _, _ = ngrams(tokenize(batch), n, short=False)
        part = (h >> shift).astype(np.int64)
        order = np.argsort(part, kind="stable")
        h, part = h[order], part[order]
        cuts = np.searchsorted(part, np.arange(partitions + 1))
        for p in range(partitions):
            files[p].write(h[cuts[p]: cuts[p + 1]].tobytes())

    batch: list[bytes] = []
    size = 0
    for text in texts:
        data = text.encode("utf-8")
        batch.append(data)
        size += len(data)
        if size >= batch_bytes:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    for f in files:
        f.close()
    parts = []
    for p in range(partitions):
        path = directory / f"part{p:02d}.tmp"
        parts.append(np.unique(np.fromfile(path, dtype=np.uint64)))
        path.unlink()
    hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    bits = 1 << int(np.clip(np.ceil(np.log2(max(1, hashes.size) * 16)), 13, 36))
    bitmap = np.zeros(bits // 8, dtype=np.uint8)
    b = hashes & np.uint64(bits - 1)
    np.bitwise_or.at(bitmap, (b >> np.uint64(3)).astype(np.int64), (1 << (b & np.uint64(7))).astype(np.uint8))
    for name, arr in (("ngrams.npy", hashes), ("bitmap.npy", bitmap)):
        with atomic_path(directory / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return int(hashes.size)


@dataclass
class Cut:
    text: str | None
    """The remaining text, or None when the document is dropped."""
    cuts: int
    """Number of removed spans."""
    reason: str = ""


def _char_offsets(text: str, data: bytes, byte_pos: np.ndarray) -> np.ndarray:
    if len(text) == len(data):  # ASCII: bytes are characters
        return byte_pos
    arr = np.frombuffer(data, dtype=np.uint8)
    starts_char = np.concatenate(([0], np.cumsum((arr & 0xC0) != 0x80)))
    return starts_char[byte_pos]


def decontaminate(texts: list[str], index: NgramIndex, cfg: DecontamConfig,
                  words: Words | None = None) -> list[Cut | None]:
    """For each text: None if it shares no n-gram with the index, else the Cut."""
    out: list[Cut | None] = [None] * len(texts)
    if len(index) == 0 or not texts:
        return out
    data = [t.encode("utf-8") for t in texts]
    words = words or tokenize(data)
    h, doc, first = ngrams(words, cfg.ngram, short=False)
    hit = index.contains(h)
    if not hit.any():
        return out
    doc, first = doc[hit], first[hit]
    bounds = np.searchsorted(doc, np.arange(len(texts) + 1))
    for d in np.flatnonzero(np.diff(bounds)):
        f = first[bounds[d]: bounds[d + 1]]
        text = texts[d]
        bs = words.starts[f]
        be = words.ends[f + cfg.ngram - 1]
        cs = _char_offsets(text, data[d], bs)
        ce = _char_offsets(text, data[d], be)
        lo = np.maximum(cs - cfg.margin_chars, 0)
        hi = np.minimum(ce + cfg.margin_chars, len(text))
        # merge overlapping removal spans (they come sorted by start)
        spans: list[list[int]] = []
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        pieces, pos = [], 0
        for a, b in spans:
            if a > pos:
                pieces.append(text[pos:a])
            pos = b
        if pos < len(text):
            pieces.append(text[pos:])
        if len(pieces) > cfg.max_pieces:
            out[d] = Cut(None, len(spans), "decontam_too_many_pieces")
            continue
        kept = [p.strip() for p in pieces if len(p.strip()) >= cfg.min_piece_chars]
        if not kept:
            out[d] = Cut(None, len(spans), "decontam_contaminated")
        else:
            out[d] = Cut("\n\n".join(kept), len(spans))
    return out
