"""Text generation: sampling strategies and beam search over a preallocated KV cache.

Library API (the server and ``pilelm eval``'s BLEU use it):

- ``SamplingParams``: greedy (temperature 0), temperature, top-k, top-p, repetition penalty,
  stop strings, max new tokens, seed.
- ``DecodeBatch(model, eos_id)``: a running KV-cached batch for continuous batching (the
  server's): ``add`` prefills new rows and merges them into the cache between decode steps,
  ``step`` samples one token per live row, ``drop`` ends rows. Rows that finish leave the
  cache, so a long row does not pay for short ones. Each row samples with its own seeded
  ``torch.Generator`` and keeps its own positions: a row's tokens depend on its prompt, params
  and seed, not on what else is in the batch or when it joined.
- ``stream_batch(model, prompts, params, eos_id)``: a ``DecodeBatch`` of fixed rows; yields,
  after every decode step, the new token of every row (``None`` once a row is done).
- ``generate(model, tokenizer, prompts, params)``: prompts in, clean completions out.
- ``beam_search(model, prompt, num_beams, max_new_tokens, eos_id)``.
- ``IncrementalDecoder``: token ids in, text deltas out, never splitting a UTF-8 character.

The logits processors follow the order and formulas of Hugging Face ``generate``
(repetition penalty, temperature, top-k, top-p), so greedy decoding gives the same tokens.
``run_generate`` is the ``pilelm generate`` stage: it streams the text to the terminal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.core.atomic import atomic_write_text
from pilelm.models.dtypes import resolve_dtype
from pilelm.models.gpt import GPTConfig, KVCache

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (``pilelm.tokens.tokenizer.PileTokenizer`` has it)."""

    eod_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    """Most tokens to generate per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL penalty (Keskar et al. 2019) on tokens already in the prompt or output; 1 = off."""
    stop: list[str] = field(default_factory=list)
    """Stop at the first of these strings (which is cut from the text)."""
    seed: int | None = None
    """Seed of this request's sampler; None draws one from torch's global RNG."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def fit_prompt(prompt: Sequence[int], max_new_tokens: int, block_size: int, eos_id: int | None) -> list[int]:
    """The prompt the model can see: an empty prompt starts from ``eos_id`` (GPT-2's
    <|endoftext|> convention), and a prompt too long for ``block_size`` together with the new
    tokens keeps its most recent tokens."""
    if max_new_tokens >= block_size:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({block_size})")
    ids = list(prompt)
    if not ids:
        if eos_id is None:
            raise ValueError("an empty prompt needs an end-of-text token to start from; the tokenizer has none")
        ids = [eos_id]
    room = block_size - max_new_tokens
    if len(ids) > room:
        log.warning("prompt of %d tokens cut to its last %d to fit the context of %d", len(ids), room, block_size)
        ids = ids[-room:]
    return ids


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL (Keskar et al. 2019, eq. in sec. 4.1), as Hugging Face applies it: a seen token's
    positive logit is divided by the penalty, a negative one multiplied. logits (b, V) float;
    seen (b, V) bool; penalty (b,)."""
    pen = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k then top-p (Holtzman et al. 2019) filtering of tempered logits (b, V).

    Returns (filtered logits sorted descending, their token ids); removed tokens are -inf.
    The most likely token always survives.
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # (b, V)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    remove = (top_k[:, None] > 0) & (ranks[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach top_p.
    remove = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf")), sorted_ids


class _RowSampler:
    """Per-row sampling settings of the rows still decoding, as tensors."""

    def __init__(self, params: list[SamplingParams], device: torch.device, vocab: int):
        self.params = params
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=device, dtype=torch.long)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        self.generators = [_generator(p.seed, device) for p in params]
        self._update()

    def _update(self) -> None:
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in self.params)
        self.sampled_rows = [j for j, p in enumerate(self.params) if p.temperature > 0]

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        self.params = [self.params[i] for i in rows]
        self.temperature = self.temperature[index]
        self.top_k = self.top_k[index]
        self.top_p = self.top_p[index]
        self.penalty = self.penalty[index]
        self.generators = [self.generators[i] for i in rows]
        self._update()

    def extend(self, other: _RowSampler) -> None:
        """Append ``other``'s rows after these."""
        self.params = self.params + other.params
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k = torch.cat([self.top_k, other.top_k])
        self.top_p = torch.cat([self.top_p, other.top_p])
        self.penalty = torch.cat([self.penalty, other.penalty])
        self.generators = self.generators + other.generators
        self._update()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (b, V) float32 -> next tokens (b,)."""
        if self.use_penalty and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        tokens = logits.argmax(dim=-1)
        rows = self.sampled_rows
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tempered = logits[index] / self.temperature[index, None]
            filtered, ids = filter_top_k_top_p(tempered, self.top_k[index], self.top_p[index])
            probs = filtered.softmax(dim=-1)
            for j, row in enumerate(rows):
                choice = torch.multinomial(probs[j], 1, generator=self.generators[row])
                tokens[row] = ids[j, choice[0]]
        return tokens


class DecodeBatch:
    """A running KV-cached batch that rows join and leave between decode steps: continuous
    (in-flight) batching as vLLM and TGI schedule it.

    ``add(prompts, params)`` prefills new rows and merges them into the running cache and
    returns their ids; ``step()`` samples one token for every live row; ``drop(ids)`` ends rows.
    A row leaves by itself when it samples ``eos_id`` or reaches its ``max_new_tokens``.

    Every row is right-aligned at ``cache.length``: its real tokens fill the columns
    ``[start, length)``, the columns before ``start`` are padding (``key_mask`` False), and it
    has its own positions, so it computes what it would alone: its tokens depend only on its
    prompt, params and seed, not on its neighbours or on when it joined.

    A token is fed lazily: each row holds a pending token (its last prompt token, then each
    sampled token) that the one-token forward at the start of the next ``step`` feeds. So rows
    dropped between steps cost no forward, and new rows, whose prefill covers their prompt but
    its last token, join the very next step's forward with the rest.

    Memory: ``cache`` is a window (the first rows, columns from an offset) onto a larger store,
    so that joining and leaving copy only the rows that move, not the whole cache: a new row is
    written into a free slot, a leaving row's slot is filled by the last row, and cutting the
    leading columns that are padding for every row (compaction, which keeps ``cache.length`` the
    longest live row, never more than the model's context) moves the window's offset. The store
    is reallocated, with room to spare, only when the rows or the columns they may still need
    outgrow it; the first allocation is exact (``stream_batch`` never grows).
    """

    def __init__(self, model: nn.Module, eos_id: int | None, device: str | torch.device | None = None):
        self.model = model
        self.cfg: GPTConfig = model.cfg
        self.eos_id = eos_id
        model_device, self.dtype = _model_device_dtype(model)
        self.device = model_device if device is None else torch.device(device)
        self.ids: list[int] = []  # id of each cache row
        self.budget: list[int] = []  # tokens each row may still sample
        self.start: list[int] = []  # first real (unpadded) cache column of each row
        self.cache: KVCache | None = None  # the window onto _store that the model sees
        self._store: KVCache | None = None
        self._offset = 0  # the window's first column in the store
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) token to feed next
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) its position
        self.seen = torch.zeros(0, self.cfg.vocab_size, dtype=torch.bool, device=self.device)  # (B, V)
        self.sampler = _RowSampler([], self.device, self.cfg.vocab_size)
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, row_id: object) -> bool:
        return row_id in self.ids

    def _set_window(self, length: int) -> None:
        store, B, off = self._store, len(self.ids), self._offset
        assert store is not None
        if self.cache is None:
            self.cache = KVCache(self.cfg, 0, 0, self.device, self.dtype)
        self.cache.kv = store.kv[:, :, :B, :, off:]  # (n_layer, 2, B, nh, max_len, hs), a view
        self.cache.key_mask = store.key_mask[:B, off:]
        self.cache.max_len = store.max_len - off
        self.cache.length = length
        self.cache.padded = max(self.start) > 0

    def _relayout(self, rows: int, columns: int, offset: int, spare: bool) -> None:
        """Move the live rows into a new store of ``rows`` slots and ``columns`` columns (plus
        a quarter more of each when ``spare``), their window starting at column ``offset``."""
        if spare:
            rows, columns = rows + max(4, rows // 4), columns + max(16, columns // 4)
        store = KVCache(self.cfg, rows, columns, self.device, self.dtype)
        if self.cache is not None and self.ids:
            B, L = len(self.ids), self.cache.length
            store.kv[:, :, :B, :, offset : offset + L] = self.cache.kv[:, :, :, :, :L]
            store.key_mask[:B, offset : offset + L] = self.cache.key_mask[:, :L]
        self._store, self._offset = store, offset

    @torch.inference_mode()
    def add(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[int]:
        """Prefill ``prompts`` (left-padded among themselves) and merge them into the batch;
        returns their ids. The rows already running are unchanged if this raises."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        cfg, device = self.cfg, self.device
        rows = [fit_prompt(p, sp.max_new_tokens, cfg.block_size, self.eos_id) for p, sp in zip(prompts, params, strict=True)]
        n_new = len(rows)
        ctx = [len(r) - 1 for r in rows]  # tokens to prefill; the last one is the row's pending token
        P = max(ctx)
        prefill = None
        if P > 0:
            pad = 0 if self.eos_id is None else self.eos_id
            tokens = torch.full((n_new, P), pad, dtype=torch.long, device=device)
            for i, r in enumerate(rows):
                tokens[i, P - ctx[i] :] = torch.tensor(r[:-1], dtype=torch.long)
            n_pad = torch.tensor([P - c for c in ctx], device=device)  # (n,)
            prefill = KVCache(cfg, n_new, P, device, self.dtype)
            prefill.key_mask[:, :P] = torch.arange(P, device=device)[None, :] >= n_pad[:, None]
            positions = (torch.arange(P, device=device)[None, :] - n_pad[:, None]).clamp(min=0)  # (n, P)
            self.model(tokens, cache=prefill, positions=positions, last_only=True)
        sampler = _RowSampler(params, device, cfg.vocab_size)
        seen = torch.zeros(n_new, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r, device=device)] = True

        # Merge: old and new rows right-aligned at the longer of the two filled lengths (the
        # window moves left when the new rows are longer), with room for the most tokens any
        # row may still feed.
        B = len(self.ids)
        L = self.cache.length if self.ids else 0
        length = max(L, P)
        budget = self.budget + [sp.max_new_tokens for sp in params]
        columns = length + max(budget)  # the window's columns the rows may use
        offset = self._offset - (length - L)
        store = self._store
        if store is None or B + n_new > store.kv.size(2) or offset < 0 or offset + columns > store.max_len:
            self._relayout(B + n_new, columns, length - L, spare=store is not None)
            offset, store = 0, self._store
            assert store is not None
        new = slice(B, B + n_new)
        store.key_mask[:B, offset : offset + length - L] = False  # old rows: padding where the window grew
        store.key_mask[new, offset:] = True
        store.key_mask[new, offset : offset + length - P] = False
        if prefill is not None:
            store.kv[:, :, new, :, offset + length - P : offset + length] = prefill.kv[:, :, :, :, :P]
            store.key_mask[new, offset + length - P : offset + length] = prefill.key_mask[:, :P]

        ids = list(range(self._next_id, self._next_id + n_new))
        self._next_id += n_new
        self.ids += ids
        self.budget = budget
        self.start = [s + length - L for s in self.start] + [length - c for c in ctx]
        self._offset = offset
        self._set_window(length)
        self.pending = torch.cat([self.pending, torch.tensor([r[-1] for r in rows], device=device)])
        self.pos = torch.cat([self.pos, torch.tensor(ctx, device=device)])
        self.seen = torch.cat([self.seen, seen])
        self.sampler.extend(sampler)
        return ids

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """Feed every live row its pending token and sample its next one: {row id: token}.

        Rows that sampled eos or reached their budget have left the batch when this returns.
        """
        if not self.ids:
            return {}
        assert self.cache is not None
        logits, _ = self.model(self.pending[:, None], cache=self.cache, positions=self.pos[:, None], last_only=True)
        nxt = self.sampler(logits[:, -1].float(), self.seen)  # (B,)
        if self.sampler.use_penalty:  # only a penalised row reads its seen tokens
            self.seen.scatter_(1, nxt[:, None], True)
        self.pending = nxt
        self.pos = self.pos + 1
        tokens = nxt.tolist()
        out = dict(zip(self.ids, tokens, strict=True))
        ended = []
        for j, (row_id, token) in enumerate(out.items()):
            self.budget[j] -= 1
            if self.budget[j] == 0 or token == self.eos_id:
                ended.append(row_id)
        self.drop(ended)
        return out

    @torch.inference_mode()
    def drop(self, row_ids: Collection[int]) -> None:
        """End these rows (ids not in the batch are ignored) and compact the cache: leading
        columns that are padding for every row left are cut, so ``cache.length`` stays the
        longest live row (never more than the model's context)."""
        gone = set(row_ids)
        if not gone.intersection(self.ids):
            return
        cache, store = self.cache, self._store
        assert cache is not None and store is not None
        B = len(self.ids)
        kept = [j for j, row_id in enumerate(self.ids) if row_id not in gone]
        if not kept:
            self.ids, self.budget, self.start = [], [], []
            self.cache = self._store = None  # the memory goes back until rows come again
            self._offset = 0
            self.pending, self.pos, self.seen = self.pending[:0], self.pos[:0], self.seen[:0]
            self.sampler.keep([])
            return
        # The last live rows move into the freed slots below len(kept); the others stay put.
        n = len(kept)
        holes = [j for j in range(n) if self.ids[j] in gone]
        movers = [j for j in range(n, B) if self.ids[j] not in gone]
        order = list(range(n))  # order[slot] = the row (old slot) that is there now
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            window = store.kv.narrow(4, self._offset, cache.length)
            window.index_copy_(2, dst, window.index_select(2, src))
            store.key_mask.index_copy_(0, dst, store.key_mask.index_select(0, src))
        index = torch.tensor(order, device=self.device)
        self.ids = [self.ids[j] for j in order]
        self.budget = [self.budget[j] for j in order]
        start = [self.start[j] for j in order]
        cut = min(start)
        self.start = [s - cut for s in start]
        self._offset += cut
        self._set_window(cache.length - cut)
        self.pending, self.pos, self.seen = self.pending[index], self.pos[index], self.seen[index]
        self.sampler.keep(order)


@torch.inference_mode()
def stream_batch(
    model: nn.Module,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_id: int | None,
    device: str | torch.device = "cpu",
) -> Iterator[list[int | None]]:
    """Decode a batch of token prompts together; yield each step's new token per row.

    A row yields its eos token (when it samples it) and ``None`` at every later step, as it
    does once it has ``max_new_tokens``. The caller may stop iterating at any time, or finish
    single rows early by ``send``-ing a collection of row indices (e.g. when a stop string
    appeared): ``gen.send({2})`` ends row 2 and returns the next step. A ``DecodeBatch`` that
    no row joins after the first.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return
    batch = DecodeBatch(model, eos_id, device)
    ids = batch.add(prompts, params)
    row_of = {row_id: i for i, row_id in enumerate(ids)}
    while len(batch):
        out: list[int | None] = [None] * len(prompts)
        for row_id, token in batch.step().items():
            out[row_of[row_id]] = token
        requested = yield out
        if requested:
            batch.drop([ids[int(r)] for r in requested if 0 <= int(r) < len(ids)])


def clean_text(text: str) -> str:
    """Normalise generated text: one newline convention, no trailing whitespace, no dangling
    replacement character from a UTF-8 sequence cut by the token limit."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip("\ufffd").rstrip()


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line -> the characters."""
    return re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group()], text)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class IncrementalDecoder:
    """Token ids in, text deltas out, with special tokens dropped.

    Decodes a short window of recent tokens (not the whole output) and holds text back while
    it ends in U+FFFD, i.e. while a byte-level token sequence is in the middle of a UTF-8
    character; the same windowing TGI and vLLM use for streaming.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""


def generate(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompts: list[str],
    params: SamplingParams,
    num_beams: int = 1,
    on_text: Callable[[int, str], None] | None = None,
    length_penalty: float = 1.0,
) -> list[str]:
    """Complete each prompt (batched); returns the clean completions, without the prompts.

    ``on_text(row, delta)`` receives the text as it is generated (sampling only; beam search
    knows its text when it ends). Rows with a seed use ``seed + row`` so that repeated
    prompts give different samples.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    device, _ = _model_device_dtype(model)
    eos = tokenizer.eod_id
    ids = [tokenizer.encode(p) for p in prompts]
    if num_beams > 1:
        outputs = [beam_search(model, p, num_beams, params.max_new_tokens, eos, length_penalty) for p in ids]
        texts = [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), params.stop)[0] for o in outputs]
        texts = [clean_text(t) for t in texts]
        if on_text is not None:
            for i, t in enumerate(texts):
                on_text(i, t)
        return texts

    row_params = [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(len(ids))]
    generated: list[list[int]] = [[] for _ in ids]
    decoders = [IncrementalDecoder(tokenizer) for _ in ids]
    streamed = [""] * len(ids)
    stopped: set[int] = set()
    stream = stream_batch(model, ids, row_params, eos, device)
    finish: set[int] = set()
    try:
        while True:
            try:
                step = stream.send(finish or None)
            except StopIteration:
                break
            finish = set()
            for row, tok in enumerate(step):
                if tok is None or row in stopped or tok == eos:
                    continue
                generated[row].append(tok)
                delta = decoders[row].push(tok)
                if not delta:
                    continue
                if params.stop:
                    # Only the tail can complete a stop string that the earlier text lacked.
                    tail_from = max(0, len(streamed[row]) - max(len(s) for s in params.stop))
                    text, hit = cut_at_stop(streamed[row][tail_from:] + delta, params.stop)
                    if hit:
                        delta = text[len(streamed[row]) - tail_from :]
                        stopped.add(row)
                        finish.add(row)
                streamed[row] += delta
                if on_text is not None and delta:
                    on_text(row, delta)
    finally:
        stream.close()
    texts = []
    for toks in generated:
        text, _ = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), params.stop)
        texts.append(clean_text(text))
    return texts


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float = 1.0,
) -> list[int]:
    """The most likely continuation found by beam search; returns the new tokens (no eos).

    Each step expands every live beam and keeps the ``num_beams`` best continuations; a
    continuation that ends in eos becomes a finished hypothesis scored by sum log p /
    length ** length_penalty (Wu et al. 2016 without the +5 smoothing; Hugging Face's form).
    Search stops once ``num_beams`` hypotheses are finished and no live beam can beat the
    worst of them, or at ``max_new_tokens``.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    cfg = model.cfg
    device, dtype = _model_device_dtype(model)
    prompt = fit_prompt(prompt, max_new_tokens, cfg.block_size, eos_id)
    cache = KVCache(cfg, 1, len(prompt) + max_new_tokens, device, dtype)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    scores = torch.zeros(1, device=device, dtype=torch.float64)  # sum log p of each live beam
    beams: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    V = logits.size(-1)

    def normed(score: float, length: int) -> float:
        return score / (length**length_penalty)

    for t in range(max_new_tokens):
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1).double()  # (b, V)
        cand = (scores[:, None] + logprobs).view(-1)
        k = min(2 * num_beams, cand.numel())
        top_scores, top_idx = cand.topk(k)
        parents, next_tokens, next_scores = [], [], []
        for rank, (s, i) in enumerate(zip(top_scores.tolist(), top_idx.tolist(), strict=True)):
            beam, tok = divmod(i, V)
            if tok == eos_id:
                if rank < num_beams:  # an eos outside the best num_beams does not count
                    finished.append((normed(s, t + 1), beams[beam]))
                continue
            parents.append(beam)
            next_tokens.append(tok)
            next_scores.append(s)
            if len(parents) == num_beams:
                break
        finished.sort(key=lambda h: h[0], reverse=True)
        del finished[num_beams:]
        if not parents:  # every continuation ended: no live beam is left
            beams = []
            break
        beams = [beams[b] + [tok] for b, tok in zip(parents, next_tokens, strict=True)]
        scores = torch.tensor(next_scores, device=device, dtype=torch.float64)
        if len(finished) >= num_beams and finished[-1][0] >= normed(next_scores[0], t + 1):
            beams = []  # no live beam can beat the finished ones (HF's early_stopping=False rule)
            break
        if t + 1 == max_new_tokens:
            break
        cache.reorder(torch.tensor(parents, device=device))
        logits, _ = model(torch.tensor(next_tokens, device=device)[:, None], cache=cache, last_only=True)
    for s, b in zip(scores.tolist(), beams, strict=False):
        finished.append((normed(s, len(b)), b))
    if not finished:
        return []
    return max(finished, key=lambda h: h[0])[1]


# ---------------------------------------------------------------------------------------------
# The `pilelm generate` stage


@dataclass
class GenerateConfig:
    run: str = ""
    """Run directory (pilelm train or pilelm import output)."""
    prompt: list[str] = field(default_factory=list)
    """Prompt text; repeat --prompt for a batch. None given: one unconditional sample."""
    prompt_file: str = ""
    """A text file with one prompt per line (added after the --prompt ones)."""
    max_new_tokens: int = 128
    """Most tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no limit."""
    top_p: float = 0.95
    """Nucleus sampling mass (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL repetition penalty (> 1 discourages repeats; 1 = off)."""
    num_beams: int = 1
    """Beam search with this many beams (> 1 ignores temperature/top-k/top-p)."""
    length_penalty: float = 1.0
    """Beam search: a hypothesis scores sum log p / length ** length_penalty."""
    stop: list[str] = field(default_factory=list)
    """Stop a sample at the first of these strings (repeatable; \\n, \\t, \\r are unescaped)."""
    num_samples: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Seed for reproducible samples (sample i of the batch uses seed + i); None = random."""
    step: int | None = None
    """Checkpoint step to load; None = the latest."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, mps)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV-cache dtype; auto = bfloat16 where bf16 matmuls are native (AMX / AVX512-BF16 CPUs, CUDA), else float32."""
    output: str = ""
    """Also write the samples to this JSONL file ({prompt, completion}); empty = terminal only."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        self.sampling()  # validates the sampling keys

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop=[unescape(s) for s in self.stop],
            seed=self.seed,
        )


def _read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {path} does not exist")
        prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts or [""]


class _OrderedStream:
    """Prints batched samples in order, streaming the one on screen; later ones catch up
    from their buffers when their turn comes."""

    def __init__(self, headers: list[str], write: Callable[[str], Any]):
        self.headers = headers
        self.buffers = [""] * len(headers)
        self.done = [False] * len(headers)
        self.write = write
        self.shown = 0
        self.printed = 0
        write(headers[0])

    def text(self, row: int, delta: str) -> None:
        self.buffers[row] += delta
        self._flush()

    def finish(self, row: int) -> None:
        self.done[row] = True
        self._flush()

    def _flush(self) -> None:
        while self.shown < len(self.headers):
            buf = self.buffers[self.shown]
            if len(buf) > self.printed:
                self.write(buf[self.printed :])
                self.printed = len(buf)
            if not self.done[self.shown]:
                return
            self.write("\n")
            self.shown += 1
            self.printed = 0
            if self.shown < len(self.headers):
                self.write(self.headers[self.shown])


def run_generate(cfg: GenerateConfig, write: Callable[[str], Any] | None = None) -> Path | None:
    """Generate from a run, streaming each sample to ``write`` (default: stdout) as it comes.

    Returns the JSONL output path when ``cfg.output`` is set, else None.
    """
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    if not cfg.run:
        raise ValueError("generate needs a run directory: pilelm generate RUN_DIR --prompt ...")
    if write is None:

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step, cfg.device)
    if not isinstance(model_cfg, GPTConfig):
        raise ValueError(f"run {cfg.run} holds a {type(model_cfg).__name__} model; generate needs a causal LM (gpt)")
    model = model.to(resolve_dtype(cfg.dtype, next(model.parameters()).device))
    tokenizer = load_tokenizer(tok_dir)
    prompts = [p for p in _read_prompts(cfg) for _ in range(cfg.num_samples)]
    many = len(prompts) > 1
    headers = [(f"--- sample {i} ---\n" if many else "") + p for i, p in enumerate(prompts)]
    screen = _OrderedStream(headers, write)
    completions = generate(
        model, tokenizer, prompts, cfg.sampling(), cfg.num_beams, on_text=screen.text,
        length_penalty=cfg.length_penalty,
    )
    for row in range(len(prompts)):
        screen.finish(row)
    if not cfg.output:
        return None
    out = Path(cfg.output)
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(prompts, completions, strict=True)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    log.info("wrote %d samples to %s", len(lines), out)
    return out
