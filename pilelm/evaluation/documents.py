"""The documents an evaluation scores: one split of a shard dir or of a prepared dir, as the
tokenizer of the run being scored encodes them.

A shard dir (``pilelm tokenize`` output) is read as it is when its tokenizer is the run's; a
prepared dir (``pilelm prepare`` output) is encoded with each run's own tokenizer, so runs
with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pilelm.core.manifest import require_stage
from pilelm.data.prepared import split_files


@dataclass
class DocumentSet:
    """Documents to score, tokenized by one tokenizer."""

    tokens: list[np.ndarray]
    """Each document's tokens, without the EOD."""
    component: np.ndarray
    """Component code per document."""
    component_names: list[str]
    nbytes: np.ndarray
    """UTF-8 bytes of each document's text."""
    eod_id: int
    vocab_size: int
    """Size of the tokenizer's vocabulary (the unigram baseline's support)."""


@dataclass
class EvalData:
    """The documents of one split, in whichever form the input directory holds them."""

    path: Path
    stage: str  # "tokenize" or "prepare"
    split: str
    max_documents: int
    _cache: dict[str, DocumentSet] = field(default_factory=dict)

    def documents(self, tokenizer_dir: Path) -> DocumentSet:
        """The split's documents as the tokenizer in ``tokenizer_dir`` encodes them."""
        from pilelm.tokens.identity import fingerprint_of

        key = fingerprint_of(tokenizer_dir)
        if key not in self._cache:
            shards = self.stage == "tokenize"
            self._cache[key] = self._shard_docs(tokenizer_dir) if shards else self._prepared_docs(tokenizer_dir)
        return self._cache[key]

    def _shard_docs(self, tokenizer_dir: Path) -> DocumentSet:
        from pilelm.tokens.identity import require_same_tokenizer
        from pilelm.tokens.shards import open_split

        require_same_tokenizer(tokenizer_dir, self.path, what="eval",
                               fix="pass the prepared dir (pilelm prepare output) as --data to encode the text "
                                   "with each run's tokenizer")
        ts = open_split(self.path, self.split)
        n = len(ts.dataset) if not self.max_documents else min(self.max_documents, len(ts.dataset))
        tokens = [np.asarray(ts.dataset[i][:-1]) for i in range(n)]  # drop the appended EOD
        return DocumentSet(tokens, np.asarray(ts.component[:n]), list(ts.component_names),
                           np.asarray(ts.nbytes[:n], dtype=np.int64), int(ts.eod_id), int(ts.vocab_size))

    def _prepared_docs(self, tokenizer_dir: Path) -> DocumentSet:
        from pilelm.tokens.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        if tok.eod_id is None:
            raise ValueError(f"tokenizer {tokenizer_dir} has no end-of-document token")
        texts, comps = [], []
        for text, component in _read_prepared(self.path, self.split, self.max_documents):
            texts.append(text)
            comps.append(component)
        names = sorted(set(comps))
        code = {n: i for i, n in enumerate(names)}
        tokens = []
        for start in range(0, len(texts), 256):
            tokens += [np.asarray(t, dtype=np.int64) for t in tok.encode_batch(texts[start : start + 256])]
        nbytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
        return DocumentSet(tokens, np.array([code[c] for c in comps], dtype=np.int16), names, nbytes,
                           int(tok.eod_id), int(tok.vocab_size))

    def train_token_counts(self, tokenizer_dir: Path, vocab_size: int) -> np.ndarray | None:
        """Token frequencies of the train split (without EOD), or None if there is none."""
        if self.stage == "tokenize":
            from pilelm.tokens.shards import listed_splits, open_split

            if "train" not in listed_splits(self.path):
                return None
            ts = open_split(self.path, "train")
            counts = np.zeros(max(vocab_size, int(ts.vocab_size)), dtype=np.int64)
            flat = ts.dataset.tokens
            for start in range(0, len(flat), 1 << 24):
                counts += np.bincount(np.asarray(flat[start : start + (1 << 24)]), minlength=len(counts))[: len(counts)]
            counts[ts.eod_id] -= len(ts.dataset)  # one EOD per document, never scored
            return counts
        from pilelm.tokens.tokenizer import load_tokenizer

        if not split_files(self.path, "train"):
            return None
        tok = load_tokenizer(tokenizer_dir)
        counts = np.zeros(vocab_size, dtype=np.int64)
        batch: list[str] = []
        for text, _ in _read_prepared(self.path, "train", 0):
            batch.append(text)
            if len(batch) == 256:
                counts += _bincount(tok.encode_batch(batch), vocab_size)
                batch = []
        if batch:
            counts += _bincount(tok.encode_batch(batch), vocab_size)
        return counts


def _bincount(seqs: list[list[int]], size: int) -> np.ndarray:
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    return np.bincount(flat, minlength=size)[:size]


def _read_prepared(prep: Path, split: str, limit: int) -> Iterator[tuple[str, str]]:
    """(text, component) of a prepared split's documents in canonical order."""
    from pilelm.data.prepared import read_split

    for doc in read_split(prep, split, limit):
        yield doc.text, doc.component or "unknown"


def open_eval_data(path: str | Path, split: str, max_documents: int) -> EvalData:
    from pilelm.tokens.shards import listed_splits

    path = Path(path)
    manifest = require_stage(path, "tokenize", "prepare", what="eval data")
    stage = manifest["stage"]
    if stage == "tokenize" and split not in (have := listed_splits(path)):
        raise FileNotFoundError(f"{path} has no {split} split ({split}.bin/.idx); splits here: {have}")
    return EvalData(path, stage, split, max_documents)
