"""A model family that lives only here: a per-token MLP language model ("toy").

Importing this module registers it, the way a family folder ``pilelm/models/NAME/`` registers
itself when ``pilelm.models`` is imported. tests/training/test_toy_family.py trains it through
the real CLI to show that a family needs no edit of any other file: its ``toy`` section of the
train config, with these field docs in ``--help``, comes from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.models.spec import Batch, ModelSpec, register


@dataclass
class ToyConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the token shards' tokenizer."""
    block_size: int = 32
    """Training window in tokens."""
    d_model: int = 16
    """Width of the token embedding and of the hidden layer."""
    dropout: float = 0.0
    """Dropout after the hidden layer."""

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.block_size < 2:
            raise ValueError("toy.d_model must be >= 1 and toy.block_size >= 2")


class Toy(nn.Module):
    """Each token predicts the next from itself alone: embedding -> GELU MLP -> logits."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hidden = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.drop(F.gelu(self.hidden(self.wte(idx))))  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.encode(idx))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6.0 * sum(p.numel() for p in self.parameters())


def _eval_loss(model: nn.Module, batch: Batch) -> tuple[float, float]:
    _, loss = model(batch["input_ids"], batch["labels"])
    return float(loss) * batch["labels"].numel(), float(batch["labels"].numel())


def _train_kwargs(batch: Batch, counts: tuple[float, float], fused_loss: bool) -> dict[str, Any]:
    return {}


TOY_SPEC = register(ModelSpec(
    family="toy",
    config_cls=ToyConfig,
    model_cls=Toy,
    config_section="toy",
    objective=lambda cfg: "clm",
    needs_special_tokens=False,
    loss_normalisation="micro_batch_mean",
    train_kwargs=_train_kwargs,
    eval_loss=_eval_loss,
    hf_adapter="",  # no Hugging Face counterpart
    causal=True,
))
