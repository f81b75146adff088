"""Text embeddings from a trained model: pooled final hidden states, L2-normalised.

One encoder for every consumer of vectors (``pilelm embed``, search queries, the retrieval
evaluation, contrastive fine-tuning, ``POST /v1/embeddings``), so a query and the documents
it is compared with always go through the same code.

Pooling (Reimers & Gurevych 2019, "Sentence-BERT", sec. 3, compare mean, max and [CLS]):
- ``mean``: the average of the real tokens' states (the default; the best of the three there);
- ``last``: the state of the last real token, the only one a causal model lets see every
  token (the SGPT / E5-Mistral choice for decoders);
- ``cls``: the first state of a BERT input ``[CLS] ... [SEP]``; refused for causal models,
  whose first token sees only itself.

A causal model needs no attention mask for right padding (its real tokens never attend to
what follows them); a BERT gets one. Sequences are sorted by length before batching, so a
batch pads to nearly nothing.

A document longer than the model's context is cut into chunks of ``chunk_tokens`` tokens that
start every ``stride`` tokens; each chunk gets its own vector and ``owner`` maps it back to
its document.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.models import spec_for

log = logging.getLogger(__name__)

SMALL_WORK_TOKENS = 512
"""Inputs with at most this many tokens in all are embedded on one thread: a short query's
matmuls are too small to share, and on a busy machine the second thread's barrier waits cost
100x the work (a 14-token query: 392 ms on 2 threads, 3.4 ms on 1, at load 4)."""


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

Pooling = Literal["mean", "last", "cls"]
POOLINGS: tuple[str, ...] = ("mean", "last", "cls")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) states of right-padded rows with ``lengths`` real tokens -> (B, C), unnormalised."""
    B, T, _ = hidden.shape
    if pooling == "mean":
        mask = (torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)  # (B, T)
        return (hidden * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(hidden.dtype)
    if pooling == "last":
        return hidden[torch.arange(B, device=hidden.device), (lengths - 1).clamp(min=0)]
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def chunk_spans(n: int, chunk_tokens: int, stride: int) -> list[tuple[int, int]]:
    """Token spans [a, b) of chunks of at most ``chunk_tokens`` starting every ``stride``;
    they cover [0, n) and the last one ends at n (no chunk lies inside another)."""
    if n <= 0:
        return []
    spans = []
    a = 0
    while True:
        b = min(a + chunk_tokens, n)
        spans.append((a, b))
        if b >= n:
            return spans
        a += stride


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes, bytes), independent of files:
    an index remembers it so a query is never embedded by another model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class EncoderIdentity:
    """What makes two encoders produce comparable vectors."""

    run: str
    weights: str
    tokenizer: str
    pooling: str

    def to_json(self) -> dict[str, str]:
        return {"run": self.run, "weights": self.weights, "tokenizer": self.tokenizer, "pooling": self.pooling}

    def mismatch(self, other: dict[str, Any]) -> str | None:
        """A sentence naming what differs from ``other`` (an index's record), or None."""
        problems = []
        if other.get("weights") != self.weights:
            problems.append(f"model weights {str(other.get('weights'))[:12]} (run {other.get('run')}) "
                            f"vs {self.weights[:12]} (run {self.run})")
        if other.get("tokenizer") != self.tokenizer:
            problems.append(f"tokenizer {str(other.get('tokenizer'))[:19]} vs {self.tokenizer[:19]}")
        if other.get("pooling") != self.pooling:
            problems.append(f"pooling {other.get('pooling')} vs {self.pooling}")
        return "; ".join(problems) or None


class TextEncoder:
    """Turns texts into unit vectors with one model, tokenizer and pooling."""

    def __init__(self, model: nn.Module, model_cfg: Any, tokenizer: Any, pooling: str = "mean",
                 device: str | torch.device = "cpu", identity: EncoderIdentity | None = None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.causal = spec_for(model_cfg).causal
        if pooling == "cls" and self.causal:
            raise ValueError("pooling=cls needs a BERT model (a causal model's first token sees only itself); "
                             "use pooling=mean or pooling=last")
        self.model = model
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.device = torch.device(device)
        self.identity = identity
        # BERT inputs are [CLS] text [SEP] (Devlin et al. 2019) when the tokenizer has both.
        cls_id, sep_id = tokenizer.cls_id, tokenizer.sep_id
        self._wrap = (not self.causal) and cls_id is not None and sep_id is not None
        self._cls, self._sep = cls_id, sep_id
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @classmethod
    def from_run(cls, run: str | Path, step: int | None = None, pooling: str = "mean",
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
        from pilelm.tokens.identity import fingerprint_of
        from pilelm.tokens.tokenizer import load_tokenizer
        from pilelm.training.checkpoint import load_for_inference

        model, model_cfg, tok_dir = load_for_inference(run, step, device)
        identity = EncoderIdentity(str(run), weights_fingerprint(model), fingerprint_of(tok_dir), pooling)
        model = model.to(dtype)
        return cls(model, model_cfg, load_tokenizer(tok_dir), pooling, next(model.parameters()).device, identity)

    @property
    def dim(self) -> int:
        return int(self.model_cfg.d_model)

    @property
    def max_tokens(self) -> int:
        """Most text tokens one sequence holds (the context less [CLS] and [SEP] for a BERT)."""
        return int(self.model_cfg.block_size) - (2 if self._wrap else 0)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(list(texts))

    def forward_pooled(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token-id rows (each at most ``max_tokens``, none empty) -> (B, C) unit vectors, float32.
        Differentiable: contrastive training calls it under autograd."""
        rows = [[self._cls, *r, self._sep] if self._wrap else list(r) for r in batch]
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        ids = ids.to(self.device)
        if self.causal:
            hidden = self.model.encode(ids)  # (B, T, C)
        else:
            mask = torch.arange(T, device=self.device)[None, :] < lengths[:, None]
            hidden = self.model.encode(ids, attention_mask=mask)
        return F.normalize(pool(hidden, lengths, self.pooling).float(), dim=-1)

    @torch.inference_mode()
    def embed_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """(N, C) float32 unit vectors of token-id sequences; sorted by length so batches barely pad."""
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            out[idx] = self.forward_pooled([seqs[i] for i in idx]).cpu().numpy()
        return out

    def check_length(self, ids: Sequence[int], what: str = "text") -> None:
        """Refuse an empty or over-long single input (a query), naming the limit."""
        if not ids:
            raise ValueError(f"{what} is empty: nothing to embed")
        if len(ids) > self.max_tokens:
            raise ValueError(f"{what} is {len(ids)} tokens; the model reads at most {self.max_tokens} "
                             f"(its context {self.model_cfg.block_size}); shorten it")

    def embed_queries(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """One vector per text; a text that does not fit the context is an error."""
        ids = self.tokenize(texts)
        for i, row in enumerate(ids):
            self.check_length(row, "query" if len(ids) == 1 else f"input {i}")
        small = self.device.type == "cpu" and sum(map(len, ids)) <= SMALL_WORK_TOKENS
        with torch_threads(1) if small else contextlib.nullcontext():
            return self.embed_ids(ids, batch_size)

    def document_chunks(self, ids: Sequence[int], chunk_tokens: int = 0, stride: int = 0,
                        max_chunks: int = 0) -> list[tuple[int, int]]:
        """Chunk spans of one document's token ids (``chunk_tokens`` 0 = the context; ``stride``
        0 = ``chunk_tokens``, no overlap; ``max_chunks`` 0 = all)."""
        length = min(chunk_tokens or self.max_tokens, self.max_tokens)
        spans = chunk_spans(len(ids), length, min(stride or length, length))
        return spans[:max_chunks] if max_chunks else spans

    def embed_documents(self, texts: Sequence[str], chunk_tokens: int = 0, stride: int = 0,
                        max_chunks: int = 0, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (M, C), owner (M,)) with one vector per chunk and ``owner[j]`` its text's
        index; an empty text has no chunk."""
        pieces: list[list[int]] = []
        owner: list[int] = []
        for i, ids in enumerate(self.tokenize(texts)):
            for a, b in self.document_chunks(ids, chunk_tokens, stride, max_chunks):
                pieces.append(ids[a:b])
                owner.append(i)
        return self.embed_ids(pieces, batch_size), np.asarray(owner, dtype=np.int64)
