"""The supervised fine-tuning loop: reply-only loss on packed rows, early stopping on the
validation reply loss, resumable after a kill.

FT_DIR is a run directory (``pilelm train``'s layout, manifest stage ``train``), so eval,
generate, serve and export read it as any run:

    checkpoints/step_N/     the weights with the best validation reply loss so far (the only
                            checkpoint kept; LoRA adapters merged)
    training/checkpoints/step_N/
                            the newest training state (weights as trained, optimizer,
                            early-stopping state, RNG) a rerun resumes from
    tokenizer/              the base tokenizer plus the role tokens and the chat template

The rows of step s are a function of (seed, s) alone (``batch_indices`` over the rows made
once from the seed; ``training/order.py``), so a resumed run steps through the same batches as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.loop import ValidatedLoop
from pilelm.finetune.sft.encoding import IGNORE, SftExample, collate_rows, packed_rows
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.optim import build_optimizer
from pilelm.training.precision import Precision, resolve_precision

TRAINING = "training"


def rows_of(examples: list[SftExample], length: int, packed: bool, seed: int) -> list[list[int]]:
    if not packed:
        return [[i] for i in range(len(examples))]
    return packed_rows([len(e.ids) - 1 for e in examples], length, seed)


def reply_loss(model: torch.nn.Module, examples: list[SftExample], rows: list[list[int]], batch_size: int,
               pad_id: int, packed: bool, precision: Precision, device: torch.device) -> tuple[float, int]:
    """(mean loss per reply token, reply tokens) of ``examples`` under ``model``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), precision.autocast():
        for start in range(0, len(rows), batch_size):
            batch = collate_rows([[examples[i] for i in row] for row in rows[start:start + batch_size]], pad_id, packed)
            logits, _ = model(batch["input_ids"].to(device), segments=_segments(batch, device))
            targets = batch["targets"].to(device)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
            count += int((targets != IGNORE).sum())
    return total / max(1, count), count


def _segments(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    return batch["segments"].to(device) if "segments" in batch else None


class SftTrainer(ValidatedLoop):
    """The loop on reply loss; ``best`` is the negated validation reply loss (higher is better)."""

    metric_name = "-(reply loss)"

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, model_cfg: Any, splits: dict[str, list[SftExample]],
                 pad_id: int, device: torch.device):
        self.cfg, self.model_cfg, self.splits, self.pad_id, self.device = cfg, model_cfg, splits, pad_id, device
        self.out = Path(cfg.output)
        self.state_root = self.out / TRAINING
        self.rows = {s: rows_of(ex, cfg.max_length, cfg.sft.pack, cfg.loop.seed) for s, ex in splits.items()}
        self.num_items = len(self.rows["train"])  # rows are drawn in plain shuffled order
        self.precision = resolve_precision(cfg.loop.precision, device)
        self.model = model.to(device)
        self.precision.prepare_model(self.model)
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.model, cfg.optim), self.model)
        self.init_progress()

    @property
    def best_loss(self) -> float:
        return -self.best

    def save_best(self) -> None:
        d = ckpt_io.checkpoint_dir(self.out, self.step)
        ckpt_io.save_weights(d, self.weights(), self.model_cfg)
        ckpt_io.finalize_checkpoint(d)
        ckpt_io.prune_checkpoints(self.out, keep_last=1)

    def save_weights_to(self, d: Path) -> None:
        ckpt_io.save_weights(d, self.precision.model_state(self.model), self.model_cfg)

    def batch_loss(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        train, rows = self.splits["train"], self.rows["train"]
        picked = [[train[i] for i in rows[j]] for j in idx]
        batch = collate_rows(picked, self.pad_id, self.cfg.sft.pack)
        with self.precision.autocast():
            _, loss = self.model(batch["input_ids"].to(self.device), batch["targets"].to(self.device),
                                 segments=_segments(batch, self.device), return_logits=False)
        return loss, sum(len(r) for r in picked)

    def loss_on(self, split: str) -> tuple[float, int]:
        return reply_loss(self.model, self.splits[split], self.rows[split], self.cfg.loop.eval_batch_size,
                          self.pad_id, self.cfg.sft.pack, self.precision, self.device)

    def validation_metric(self) -> tuple[float, dict[str, Any]]:
        loss, _ = self.loss_on("val")
        return -loss, {"val_loss": loss}
