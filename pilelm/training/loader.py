"""Deterministic, resumable, rank-sharded training batches over a flat token stream.

The stream is a split's tokens as written by ``pilelm tokenize`` (every document followed by
one EOD token), read through ``pilelm.tokens.shards`` as a memmap; this module sees plain arrays.

Order: the stream is cut into fixed windows (causal LM: ``seq_len + 1`` tokens with stride
``seq_len``, so every token but the first is a target exactly once per epoch, as nanoGPT and
Megatron pack documents). Epoch ``e`` visits the windows in the permutation drawn from
``(seed, e)``. Global sample ``g`` of the run is window ``perm_e[g mod W]`` with ``e = g div W``,
so the whole order is a pure function of ``(seed, g)``: the loader state is one integer, and a
resumed run reads exactly what the uninterrupted one would have read.

Document-aligned windows (``loop.window_start=document``): the same, but window starts are the
first token of each document, and every ``seq_len`` tokens further on inside a document longer
than a window, so a window's first predictions read the document from its beginning instead of
the tail of the previous one (the modded-nanogpt speedrun aligns its batches to document
starts the same way). Every token is still a target at least once per epoch; a short document's
window runs on into the following ones, whose tokens are then seen again in their own window.

Sharding: optimizer step ``s`` consumes global samples ``[s G, (s + 1) G)`` with
``G = micro_batch * accum * world``; rank ``r`` takes the contiguous slice of
``micro_batch * accum`` samples at ``r * micro_batch * accum``, so ranks read disjoint data and a
single process with ``accum * world`` micro-batches reads the same global batch.

Masked LM (Devlin et al. 2019, sec. 3.1): 15 % of the non-special positions are chosen; of
those 80 % become [MASK], 10 % a random token, 10 % stay. Masks are drawn from a generator
seeded by ``(seed, epoch, window)``: a fresh mask every time a sequence is seen (RoBERTa's
dynamic masking, Liu et al. 2019, sec. 4.1), and identical across resumes and world sizes.
NSP pairs: segment A and, half of the time, its true continuation B, else a span from a random
window; ``[CLS] A [SEP] B [SEP]`` with token types 0/1, padded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pilelm.models.spec import IGNORE_INDEX, Objective
from pilelm.training.order import epoch_order

__all__ = ["IGNORE_INDEX", "BatchLoader", "ByteCounter", "SpecialTokens", "eval_batches", "validation_batches"]


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the masked-LM collator needs (``cls``/``sep``/``pad`` may be None for BPE)."""

    mask: int
    vocab_size: int
    cls: int | None = None
    sep: int | None = None
    pad: int = 0
    eod: int | None = None

    def ids(self) -> list[int]:
        return sorted({i for i in (self.mask, self.cls, self.sep, self.pad, self.eod) if i is not None})


def special_tokens_of(tokenizer_dir: Path, family: str) -> SpecialTokens:
    """The special ids a masked LM's batches need, from the tokenizer the shards were made with."""
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if tok.mask_id is None:
        raise ValueError(f"family={family} needs a tokenizer with a mask token; {tokenizer_dir} has none "
                         "(train a WordPiece tokenizer: pilelm tokenizer train ... --kind wordpiece)")
    return SpecialTokens(mask=tok.mask_id, vocab_size=tok.vocab_size, cls=tok.cls_id, sep=tok.sep_id,
                         pad=tok.pad_id if tok.pad_id is not None else 0, eod=tok.eod_id)


class WindowSampler:
    """Global sample index -> window start, a pure function of (seed, index) (``order.epoch_order``)."""

    def __init__(self, num_windows: int, seed: int, shuffle: bool = True):
        if num_windows < 1:
            raise ValueError("the token split is shorter than one training window; use a smaller "
                             "model.block_size or more data")
        self.num_windows = num_windows
        self.seed = seed
        self.shuffle = shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def epoch_of(self, g: int) -> int:
        return g // self.num_windows

    def windows(self, g: int, n: int) -> np.ndarray:
        """Window indices of global samples g .. g+n-1."""
        out = np.empty(n, dtype=np.int64)
        for k in range(n):
            e, i = divmod(g + k, self.num_windows)
            out[k] = self._permutation(e)[i] if self.shuffle else i
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_order(epoch, self.num_windows, self.seed))
        return self._perm[1]


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, special: SpecialTokens, prob: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence: (input ids, labels with IGNORE_INDEX where not predicted)."""
    ids = ids.astype(np.int64, copy=True)
    candidates = ~np.isin(ids, special.ids())
    chosen = (rng.random(ids.shape) < prob) & candidates
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    random_tokens = rng.integers(0, special.vocab_size, ids.shape)
    ids = np.where(chosen & (action < 0.8), special.mask, ids)
    ids = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, ids)
    return ids, labels


class BatchLoader:
    """Per optimizer step, this rank's micro-batches: ``next_step() -> list[dict[str, Tensor]]``.

    objective ``clm``: ``input_ids``, ``labels`` (B, T), labels the inputs shifted by one.
    objective ``mlm``: ``input_ids``, ``labels`` (B, T) with IGNORE_INDEX where not masked.
    objective ``mlm+nsp``: adds ``token_type_ids``, ``attention_mask`` and ``next_sentence_label``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch: int,
        accum: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        objective: Objective = "clm",
        special: SpecialTokens | None = None,
        mask_prob: float = 0.15,
        step: int = 0,
        window_starts: np.ndarray | None = None,
    ):
        if objective != "clm" and special is None:
            raise ValueError(f"objective {objective} needs the tokenizer's special tokens")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.accum = accum
        self.rank, self.world = rank, world
        self.seed = seed
        self.objective = objective
        self.special = special
        self.mask_prob = mask_prob
        self.step = step
        # CLM windows need one extra token for the shifted targets; MLM windows leave room
        # for [CLS] ... [SEP] (NSP: [CLS] A [SEP] B [SEP]).
        wrap = 0 if objective == "clm" or special.cls is None else 2 + (objective == "mlm+nsp")
        self.span = seq_len - wrap
        self.stride = self.span
        needed = self.span + (1 if objective == "clm" else 0)
        if window_starts is None:
            num_windows = (len(tokens) - needed) // self.stride + 1 if len(tokens) >= needed else 0
            self.window_starts = None
        else:
            if objective != "clm":
                raise ValueError("window_starts (document-aligned windows) are for the clm objective")
            self.window_starts = window_starts[window_starts + needed <= len(tokens)]
            num_windows = len(self.window_starts)
        self.sampler = WindowSampler(num_windows, seed)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def epoch(self) -> float:
        return self.step * self.global_batch / self.sampler.num_windows

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "num_windows": self.sampler.num_windows,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_windows", "global_batch"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                raise ValueError(f"cannot resume the data order: checkpoint {key}={state.get(key)}, "
                                 f"this run {key}={mine} (change back the data, seed or batch settings)")
        self.step = int(state["step"])

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        per_rank = self.micro_batch * self.accum
        g0 = self.step * self.global_batch + self.rank * per_rank
        self.step += 1
        out = []
        for k in range(self.accum):
            g = g0 + k * self.micro_batch
            out.append(self.batch(g, self.micro_batch))
        return out

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_step()

    def batch(self, g: int, n: int) -> dict[str, torch.Tensor]:
        """The collated global samples g .. g+n-1."""
        return self.collate(self.sampler.windows(g, n), [self.sampler.epoch_of(g + k) for k in range(n)])

    def collate(self, windows: np.ndarray, epochs: Sequence[int]) -> dict[str, torch.Tensor]:
        """The training examples of ``windows``; a masked objective draws the mask of window
        ``windows[k]`` from ``(seed, epochs[k], window)``."""
        if self.objective == "clm":
            windows = np.asarray(windows, dtype=np.int64)
            starts = windows * self.stride if self.window_starts is None else self.window_starts[windows]
            rows = np.stack([self.tokens[s : s + self.span + 1] for s in starts]).astype(np.int64)
            x = torch.from_numpy(rows)
            return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}
        examples = []
        for epoch, w in zip(epochs, windows, strict=True):
            rng = np.random.default_rng([self.seed, int(epoch), int(w)])
            if self.objective == "mlm":
                examples.append(self._mlm_example(int(w), rng))
            else:
                examples.append(self._nsp_example(int(w), rng))
        return {key: torch.from_numpy(np.stack([e[key] for e in examples])) for key in examples[0]}

    def _span(self, w: int) -> np.ndarray:
        s = w * self.stride
        return np.asarray(self.tokens[s : s + self.span], dtype=np.int64)

    def _mlm_example(self, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sp = self.special
        ids = self._span(w)
        if sp.cls is not None:
            ids = np.concatenate([[sp.cls], ids, [sp.sep if sp.sep is not None else sp.eod]])
        inputs, labels = mask_tokens(ids, rng, sp, self.mask_prob)
        return {"input_ids": inputs, "labels": labels}

    def _one_document(self, span: np.ndarray) -> np.ndarray:
        """The longest piece of ``span`` that crosses no EOD token (a segment of one document)."""
        eod = self.special.eod
        if eod is None:
            return span
        cuts = np.flatnonzero(span == eod)
        bounds = np.concatenate([[-1], cuts, [len(span)]])
        lengths = np.diff(bounds) - 1
        i = int(np.argmax(lengths))
        return span[bounds[i] + 1 : bounds[i + 1]]

    def _nsp_example(self, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sp = self.special
        sep = sp.sep if sp.sep is not None else sp.eod
        seg = self._one_document(self._span(w))
        if len(seg) < 2:  # a window of separators only: fall back to the raw span
            seg = self._span(w)
        cut = int(rng.integers(1, len(seg)))
        a = seg[:cut]
        is_next = bool(rng.random() < 0.5)
        if is_next:
            b = seg[cut:]
        else:
            n = self.sampler.num_windows
            other = int(rng.integers(0, n - 1)) if n > 1 else w
            if n > 1 and other >= w:  # any window but this one
                other += 1
            b = self._one_document(self._span(other))[: len(seg) - cut]
        ids = np.concatenate([[sp.cls], a, [sep], b, [sep]]).astype(np.int64)
        types = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        inputs, labels = mask_tokens(ids, rng, sp, self.mask_prob)
        pad = self.seq_len - len(ids)
        return {
            "input_ids": np.pad(inputs, (0, pad), constant_values=sp.pad),
            "labels": np.pad(labels, (0, pad), constant_values=IGNORE_INDEX),
            "token_type_ids": np.pad(types, (0, pad)),
            "attention_mask": np.pad(np.ones(len(ids), np.int64), (0, pad)),
            "next_sentence_label": np.array(0 if is_next else 1, dtype=np.int64),  # BERT: 0 = is next
        }


def document_window_starts(doc_sizes: np.ndarray, seq_len: int) -> np.ndarray:
    """Window starts of document-aligned training: each document's first token and every
    ``seq_len`` tokens after it inside the document (``doc_sizes`` count each EOD)."""
    sizes = np.asarray(doc_sizes, dtype=np.int64)
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    per_doc = np.maximum(1, -(-sizes // seq_len))  # ceil: windows starting inside each document
    doc = np.repeat(np.arange(len(sizes)), per_doc)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    return first[doc] + k * seq_len


class ByteCounter:
    """UTF-8 bytes of stream positions, from per-document byte counts (``docmeta.npz`` nbytes).

    A document's bytes are spread evenly over its tokens (EOD included), so the bytes of any
    range of positions are exact at document boundaries and the total is exact.
    """

    def __init__(self, doc_sizes: np.ndarray, doc_bytes: np.ndarray):
        self.doc_end = np.cumsum(doc_sizes, dtype=np.int64)
        self.doc_start = self.doc_end - doc_sizes
        self.sizes = np.asarray(doc_sizes, dtype=np.float64)
        self.byte_start = np.concatenate([[0], np.cumsum(doc_bytes, dtype=np.float64)[:-1]])
        self.nbytes = np.asarray(doc_bytes, dtype=np.float64)

    def offset(self, pos: np.ndarray) -> np.ndarray:
        """Bytes before stream position ``pos`` (0 <= pos <= total tokens)."""
        pos = np.asarray(pos, dtype=np.int64)
        doc = np.clip(np.searchsorted(self.doc_end, pos, side="right"), 0, len(self.doc_end) - 1)
        frac = np.clip((pos - self.doc_start[doc]) / np.maximum(self.sizes[doc], 1), 0.0, 1.0)
        return self.byte_start[doc] + self.nbytes[doc] * frac


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch: int, max_windows: int = 0, rank: int = 0, world: int = 1,
    counter: ByteCounter | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """Sequential causal-LM windows of a held-out split: (inputs, targets, bytes of the targets).

    Windows are taken in stream order (the first ``max_windows``, or all when 0) and dealt to
    ranks round-robin by batch.
    """
    n = (len(tokens) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    for b, first in enumerate(range(0, n, batch)):
        if b % world != rank:
            continue
        starts = np.arange(first, min(first + batch, n)) * seq_len
        rows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        nbytes = 0.0
        if counter is not None:
            nbytes = float((counter.offset(starts + seq_len + 1) - counter.offset(starts + 1)).sum())
        yield rows[:, :-1], rows[:, 1:], nbytes


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch: int, max_windows: int = 0, rank: int = 0, world: int = 1, *,
    objective: Objective = "clm", counter: ByteCounter | None = None, seed: int = 0,
    special: SpecialTokens | None = None, mask_prob: float = 0.15,
) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Held-out batches for an objective, dealt to ranks round-robin by batch: (collated
    batch, bytes of its targets). clm: the sequential windows of ``eval_batches``; masked
    objectives: the first windows of the training collation, with masks fixed by ``seed``
    (no byte count: 0)."""
    if objective == "clm":
        for x, y, nbytes in eval_batches(tokens, seq_len, batch, max_windows, rank, world, counter):
            yield {"input_ids": x, "labels": y}, nbytes
        return
    val = BatchLoader(tokens, seq_len, batch, 1, seed=seed, objective=objective, special=special,
                      mask_prob=mask_prob)
    n = min(val.sampler.num_windows, max_windows or val.sampler.num_windows)
    for b, g in enumerate(range(0, n, batch)):
        if b % world == rank:
            yield val.batch(g, min(batch, n - g)), 0.0
