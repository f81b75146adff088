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
once from the seed), so a resumed run steps through the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.sft.encoding import IGNORE, SftExample, collate_rows, packed_rows
from pilelm.finetune.stage import batch_indices
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.metrics import MetricsLog
from pilelm.training.optim import build_optimizer, lr_multiplier, set_lr
from pilelm.training.precision import Precision, resolve_precision

log = logging.getLogger(__name__)

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


class SftTrainer:
    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, model_cfg: Any, splits: dict[str, list[SftExample]],
                 pad_id: int, device: torch.device):
        self.cfg, self.model_cfg, self.splits, self.pad_id, self.device = cfg, model_cfg, splits, pad_id, device
        self.out = Path(cfg.output)
        loop = cfg.loop
        self.length = cfg.max_length
        self.rows = {s: rows_of(ex, self.length, cfg.sft.pack, loop.seed) for s, ex in splits.items()}
        self.precision = resolve_precision(loop.precision, device)
        self.model = model.to(device)
        self.precision.prepare_model(self.model)
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.model, cfg.optim), self.model)
        self.step, self.best, self.best_step, self.bad_evals = 0, math.inf, 0, 0
        self.done, self.preempted = False, False
        self.examples_seen, self.train_seconds = 0, 0.0

    # --- checkpoints -----------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to keep: fp32 masters if any, adapters merged."""
        if self.cfg.lora.r:
            from pilelm.finetune.lora import merged_state

            return merged_state(self.model)
        return self.precision.model_state(self.model)

    def save_best(self) -> None:
        d = ckpt_io.checkpoint_dir(self.out, self.step)
        ckpt_io.save_weights(d, self.weights(), self.model_cfg)
        ckpt_io.finalize_checkpoint(d)
        ckpt_io.prune_checkpoints(self.out, keep_last=1)

    def save(self) -> None:
        d = ckpt_io.checkpoint_dir(self.out / TRAINING, self.step)
        ckpt_io.save_weights(d, self.precision.model_state(self.model), self.model_cfg)
        ckpt_io.save_torch(d / ckpt_io.TRAIN_STATE, {
            "step": self.step, "optimizer": self.optimizer.state_dict(), "best": self.best,
            "best_step": self.best_step, "bad_evals": self.bad_evals, "done": self.done,
            "examples_seen": self.examples_seen,
        })
        ckpt_io.save_torch(d / ckpt_io.rng_file(0), {"cpu": torch.get_rng_state()})
        ckpt_io.finalize_checkpoint(d)
        ckpt_io.prune_checkpoints(self.out / TRAINING, keep_last=1)

    def resume(self) -> None:
        found = ckpt_io.find_resumable(self.out / TRAINING) if self.cfg.resume else None
        if found is None:
            return
        step, d = found
        from safetensors.torch import load_file

        self.precision.load_model_state(self.model, load_file(str(d / "model.safetensors")))
        state = ckpt_io.load_torch(d / ckpt_io.TRAIN_STATE)
        self.optimizer.load_state_dict(state["optimizer"])
        for key in ("step", "best", "best_step", "bad_evals", "done", "examples_seen"):
            setattr(self, key, state[key])
        torch.set_rng_state(ckpt_io.load_torch(d / ckpt_io.rng_file(0))["cpu"])
        log.info("resumed from %s (step %d, best reply loss %.4f at step %d)", d, step, self.best, self.best_step)

    # --- the loop --------------------------------------------------------------------------

    def train_step(self) -> float:
        cfg, loop = self.cfg, self.cfg.loop
        self.model.train()
        set_lr(self.optimizer, lr_multiplier(self.step, loop.max_steps, cfg.schedule))
        train, rows = self.splits["train"], self.rows["train"]
        picked = [[train[i] for i in rows[j]] for j in batch_indices(self.step, loop.batch_size, len(rows), loop.seed)]
        batch = collate_rows(picked, self.pad_id, cfg.sft.pack)
        with self.precision.autocast():
            _, loss = self.model(batch["input_ids"].to(self.device), batch["targets"].to(self.device),
                                 segments=_segments(batch, self.device), return_logits=False)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.examples_seen += sum(len(r) for r in picked)
        return float(loss.detach())

    def loss_on(self, split: str) -> tuple[float, int]:
        return reply_loss(self.model, self.splits[split], self.rows[split], self.cfg.loop.eval_batch_size,
                          self.pad_id, self.cfg.sft.pack, self.precision, self.device)

    def validate(self, metrics_log: MetricsLog) -> None:
        loss, _ = self.loss_on("val")
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: validation reply loss is {loss}; lower optim.lr")
        if loss < self.best - self.cfg.loop.min_delta:
            self.best, self.best_step, self.bad_evals = loss, self.step, 0
            self.save_best()
        else:
            self.bad_evals += 1
        metrics_log.write({"step": self.step, "val_loss": loss})
        log.info("step %d: val reply loss %.4f (best %.4f at step %d)", self.step, loss, self.best, self.best_step)
        patience = self.cfg.loop.patience
        if patience and self.bad_evals >= patience:
            log.info("early stop: %d validations without improvement", self.bad_evals)
            self.done = True

    def fit(self) -> None:
        loop = self.cfg.loop
        self.resume()
        metrics_log = MetricsLog(self.out, self.step, True, loop.tensorboard)
        bar = tqdm(total=loop.max_steps, initial=self.step, desc="finetune sft", unit="step", disable=None)
        t0, seen0 = time.perf_counter(), self.examples_seen
        try:
            while not self.done and self.step < loop.max_steps:
                loss = self.train_step()
                bar.update(1)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: training loss is {loss}; lower optim.lr")
                if self.step % loop.log_every == 0:
                    rate = (self.examples_seen - seen0) / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
                    metrics_log.write({"step": self.step, "loss": loss, "examples_per_s": rate,
                                       "lr": self.optimizer.param_groups[0]["lr"]})
                if self.step % loop.eval_every == 0 or self.step == loop.max_steps:
                    self.validate(metrics_log)
                    self.done = self.done or self.step >= loop.max_steps
                    self.save()
                if loop.stop_at_step and self.step >= loop.stop_at_step and not self.done:
                    self.save()
                    self.preempted = True
                    log.info("stopped at step %d (loop.stop_at_step); rerun the same command to resume", self.step)
                    break
        finally:
            bar.close()
            metrics_log.close()
        self.train_seconds = time.perf_counter() - t0
