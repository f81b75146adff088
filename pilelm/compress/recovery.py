"""The recovery fine-tune after pruning: a few steps of ordinary training from the pruned weights.

It is ``pilelm train`` with ``init_from`` the pruned model (``Trainer``, so checkpoints and
resume after a kill are the training loop's). Magnitude-pruned weights must stay zero while the
rest adapt: their gradients are masked, and with AdamW or LAMB a weight whose gradient is
always zero never moves (both moments stay 0; decoupled weight decay shrinks 0 to 0), so the
fine-tune uses AdamW (Muon's orthogonalised updates would fill the zeros in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pilelm.core.config import load_config
from pilelm.training.config import TrainConfig
from pilelm.training.trainer import ManifestEntry, Trainer

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    """What the fine-tune needs from the stage that pruned."""

    init_from: Path
    """The pruned run (its newest checkpoint is the starting point)."""
    output: Path
    """The run directory the fine-tune writes (the stage's output)."""
    data: str
    steps: int
    lr: float
    micro_batch: int
    masked: list[str]
    """Parameters whose zeros must stay zero (magnitude pruning); empty for structured."""
    manifest: ManifestEntry
    """The stage's manifest entry (stage, config, inputs, counts)."""


def recovery_train_config(r: Recovery) -> TrainConfig:
    """A short fine-tune: warmup over a tenth of the steps, cosine to a tenth of ``lr``,
    validation and a checkpoint at the end (and every 100 steps)."""
    return load_config(TrainConfig, overrides={
        "data": r.data, "output": str(r.output), "init_from": str(r.init_from),
        "optim": {"lr": r.lr}, "schedule": {"warmup_steps": r.steps // 10},
        "loop": {"max_steps": r.steps, "micro_batch": r.micro_batch, "eval_every": r.steps,
                 "save_every": min(r.steps, 100), "log_every": max(1, min(r.steps // 10, 10))},
    })


class RecoveryTrainer(Trainer):
    """``Trainer`` that keeps masked weights at zero and writes the pruning stage's manifest."""

    def __init__(self, r: Recovery):
        super().__init__(recovery_train_config(r))
        self.recovery = r
        params = dict(self.raw_model.named_parameters())
        for name in r.masked:
            keep = (params[name].detach() != 0).to(params[name].dtype)
            params[name].register_hook(lambda g, keep=keep: g * keep.to(g.dtype))

    def manifest_entry(self) -> ManifestEntry:
        return self.recovery.manifest


def recover(r: Recovery) -> Path:
    """Fine-tune the pruned model into ``r.output``; returns it."""
    log.info("recovery fine-tune: %d steps on %s from %s", r.steps, r.data, r.init_from)
    return RecoveryTrainer(r).fit()
