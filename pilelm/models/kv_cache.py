"""The key/value cache of a GPT model's incremental decoding."""

from __future__ import annotations

from typing import Protocol

import torch


class CacheShape(Protocol):
    """The sizes a cache is allocated by (``GPTConfig`` has them; the model imports this module,
    so the cache names the sizes instead of importing the model's config)."""

    @property
    def n_layer(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def head_size(self) -> int: ...


class KVCache:
    """Preallocated keys and values for every layer: ``kv`` (n_layer, 2, B, nh, max_len, hs).

    ``length`` positions are filled (the same for every row; left padding keeps rows aligned);
    ``key_mask`` (B, max_len) marks which filled positions are real tokens, not padding; set it
    before the first forward (the model reads it to decide whether decode steps need a mask).

    On CPU a bf16/fp16 model keeps its cache in fp32: the keys and values are the half-precision
    values, stored exactly, and attention over them runs in fp32, whose small batched matmuls
    are faster than bf16's on CPU (docs/generate.md, "Decoding throughput") and more accurate.
    """

    def __init__(self, cfg: CacheShape, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype):
        if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        # Keys and values of a layer side by side, so one copy stores a decoded token's both.
        self.kv = torch.zeros((cfg.n_layer, 2, batch, cfg.n_head, max_len, cfg.head_size), device=device, dtype=dtype)
        self.key_mask = torch.ones(batch, max_len, device=device, dtype=torch.bool)
        self.padded: bool | None = None  # any False in key_mask (see has_padding)
        self.length = 0
        self.max_len = max_len

    def has_padding(self, recheck: bool = False) -> bool:
        """Whether ``key_mask`` marks any padding; read once and remembered (multi-token
        forwards recheck, since callers set the mask before a prefill)."""
        if self.padded is None or recheck:
            self.padded = not bool(self.key_mask.all())
        return self.padded

    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, 0]  # (n_layer, B, nh, max_len, hs)

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search keeps the beams' parents)."""
        self.kv = self.kv.index_select(2, index)
        self.key_mask = self.key_mask.index_select(0, index)
