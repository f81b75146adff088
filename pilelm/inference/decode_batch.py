"""A running KV-cached batch that rows join and leave between decode steps (continuous
batching, the server's), and ``stream_batch``: such a batch of fixed rows.

``DecodeBatch(model, eos_id)``: ``add`` prefills new rows and merges them into the cache
between decode steps, ``step`` samples one token per live row, ``drop`` ends rows. Rows whose
params ask for ``logprobs`` / ``prompt_logprobs`` get them from the same forward passes
(``logprobs`` and ``prompt_logprobs`` after ``step`` / ``add``; ``pilelm.inference.logprobs``). Rows that
finish leave the cache, so a long row does not pay for short ones. Each row samples with its
own seeded ``torch.Generator`` and keeps its own positions: a row's tokens depend on its
prompt, params and seed, not on what else is in the batch or when it joined.

``stream_batch(model, prompts, params, eos_id)`` yields, after every decode step, the new
token of every row (``None`` once a row is done).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
import torch.nn as nn

from pilelm.inference.context import fit_prompt, model_device_dtype
from pilelm.inference.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from pilelm.inference.sampling import RowSampler, SamplingParams
from pilelm.models.gpt import GPTConfig, KVCache


class DecodeBatch:
    """A running KV-cached batch that rows join and leave between decode steps: continuous
    (in-flight) batching as vLLM and TGI schedule it.

    ``add(prompts, params)`` prefills new rows and merges them into the running cache and
    returns their ids; ``step()`` samples one token for every live row; ``drop(ids)`` ends rows.
    A row leaves by itself when it samples ``eos_id`` or reaches its ``max_new_tokens`` (a row
    with ``max_new_tokens=0`` leaves at the end of ``add``: its prompt is only scored).

    Log-probabilities come from the forwards that decode anyway: after ``step``,
    ``logprobs[row_id]`` holds the sampled token's for each row whose params set ``logprobs``;
    after ``add``, ``prompt_logprobs[row_id]`` holds the prompt's own tokens' for each new row
    whose params set ``prompt_logprobs`` (its prefill then keeps the logits of every position).

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
        model_device, self.dtype = model_device_dtype(model)
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
        self.sampler = RowSampler([], self.device, self.cfg.vocab_size)
        self._next_id = 0
        self.logprobs: dict[int, TokenLogprob] = {}  # the last step's, for rows that ask
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # the last add's, for rows that ask
        self.failed: dict[int, str] = {}  # the last step's rows whose sampling failed: {row id: their settings}

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
        scored = [i for i, sp in enumerate(params) if sp.prompt_logprobs is not None]
        scores: list[list[TokenLogprob | None]] = [[None] * len(r) for r in rows]
        if P > 0:
            pad = 0 if self.eos_id is None else self.eos_id
            tokens = torch.full((n_new, P), pad, dtype=torch.long, device=device)
            for i, r in enumerate(rows):
                tokens[i, P - ctx[i] :] = torch.tensor(r[:-1], dtype=torch.long)
            n_pad = torch.tensor([P - c for c in ctx], device=device)  # (n,)
            prefill = KVCache(cfg, n_new, P, device, self.dtype)
            prefill.key_mask[:, :P] = torch.arange(P, device=device)[None, :] >= n_pad[:, None]
            positions = (torch.arange(P, device=device)[None, :] - n_pad[:, None]).clamp(min=0)  # (n, P)
            logits, _ = self.model(tokens, cache=prefill, positions=positions, last_only=not scored)
            for i in scored:  # position P - ctx[i] + j predicts rows[i][j + 1]
                scores[i] = prompt_logprobs(logits[i, P - ctx[i] :], rows[i], params[i].prompt_logprobs or 0)
        sampler = RowSampler(params, device, cfg.vocab_size)
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
        self.prompt_logprobs = {ids[i]: scores[i] for i in scored}
        self.drop([row_id for row_id, sp in zip(ids, params, strict=True) if sp.max_new_tokens == 0])
        return ids

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """Feed every live row its pending token and sample its next one: {row id: token}.

        Rows that sampled eos or reached their budget have left the batch when this returns.
        A row whose sampling failed (probabilities not finite: ``RowSampler.failed``) gets no
        token, leaves the batch, and is listed in ``failed`` ({row id: its settings}); the
        other rows are unaffected.
        """
        if not self.ids:
            return {}
        assert self.cache is not None
        logits, _ = self.model(self.pending[:, None], cache=self.cache, positions=self.pos[:, None], last_only=True)
        nxt = self.sampler(logits[:, -1].float(), self.seen)  # (B,)
        failed = set(self.sampler.failed)
        self.failed = {self.ids[j]: self.sampler.describe(j) for j in failed}
        wanted = [j for j, p in enumerate(self.sampler.params) if p.logprobs is not None and j not in failed]
        self.logprobs = {}
        if wanted:
            index = torch.tensor(wanted, device=self.device)
            top = [self.sampler.params[j].logprobs or 0 for j in wanted]
            found = token_logprobs(logits[index, -1], nxt[index], top)
            self.logprobs = {self.ids[j]: lp for j, lp in zip(wanted, found, strict=True)}
        if self.sampler.use_penalty:  # only a penalised row reads its seen tokens
            self.seen.scatter_(1, nxt[:, None], True)
        self.pending = nxt
        self.pos = self.pos + 1
        tokens = nxt.tolist()
        out = {}
        ended = list(self.failed)
        for j, (row_id, token) in enumerate(zip(self.ids, tokens, strict=True)):
            if j in failed:
                continue
            out[row_id] = token
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
        if batch.failed:
            row_id, settings = next(iter(batch.failed.items()))
            raise FloatingPointError(f"sampling prompt {row_of[row_id]} failed: its next-token probabilities are "
                                     f"not finite ({settings}); use a temperature or repetition_penalty nearer 1")
        requested = yield out
        if requested:
            batch.drop([ids[int(r)] for r in requested if 0 <= int(r) < len(ids)])
