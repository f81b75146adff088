"""What every decoder settles before its first step: the model's device and dtype, and the
part of the prompt that fits the model's context together with the tokens to generate."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and their dtype (the KV cache takes both)."""
    p = next(model.parameters())
    return p.device, p.dtype


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
