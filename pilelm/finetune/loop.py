"""What every fine-tuning loop shares: validate every N steps, keep the best, stop early,
checkpoint the training state, resume after a kill, stop on request (``loop.stop_at_step``).

Every fine-tuning task runs on ``ValidatedLoop``: task heads (``pilelm.finetune.stage.Finetuner``:
classify, ner, punct), chat models (``pilelm.finetune.sft.trainer.SftTrainer``) and retrieval
embeddings (``pilelm.retrieval.contrastive.ContrastiveTrainer``). A task provides
``batch_loss`` (the loss of the items the loop picked), ``validation_metric`` (higher is
better), ``save_best`` and ``save_weights_to`` (the model's files in a checkpoint folder); the
loop shares with ``pilelm train`` its batch order (``training/order.py``), its schedule
(``optim.lr_multiplier``), its checkpoint files (``training/checkpoint.py``) and its refusal of
a changed config (``training/resume.py``). Training states live in
``state_root/checkpoints/step_N/`` (only the newest is kept): the weights, the optimizer, the
early-stopping state and the RNG, so a rerun continues where a killed one stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pilelm.core.atomic import atomic_write_text
from pilelm.core.config import dump_yaml
from pilelm.core.manifest import MANIFEST, clear_manifest
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.metrics_log import MetricsLog
from pilelm.training.optim import lr_multiplier, set_lr
from pilelm.training.order import batch_indices, steps_per_epoch
from pilelm.training.precision import Precision
from pilelm.training.resume import INPUTS_FILE, RESUME_NEUTRAL

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# What a fine-tune may change between resumes besides train's keys: its data files are
# compared by content hash (``input_file_differences``), so a moved file is the same data.
FINETUNE_NEUTRAL = RESUME_NEUTRAL | {"val_data", "test_data", "loop.epochs"}
# What a fine-tune writes in FT_DIR; a fresh start removes these (and nothing else) first.
RUN_FILES = (ckpt_io.CHECKPOINTS, "best", ".best.tmp", ".best.old", "training", "metrics.jsonl", "tensorboard",
             "results.json", "results.md", "curves.png", "confusion.png", "before.json", "tokenizer",
             INPUTS_FILE, CONFIG_FILE, MANIFEST)


def input_files(cfg: Any) -> dict[str, list[str]]:
    """The data files of a fine-tune by role, as compared on resume."""
    return {"data": [str(p) for p in cfg.data], "val_data": [str(p) for p in cfg.val_data],
            "test_data": [str(p) for p in cfg.test_data]}


def open_output(out: Path, state_root: Path, cfg: Any) -> bool:
    """Make ``out`` ready for a fine-tune; True when it resumes (``resume=true`` and an intact
    training state in ``state_root``). A fresh start first removes what an earlier run left
    (checkpoints, best model, results, manifest, tokenizer: ``RUN_FILES``), so nothing of the
    old run can outlive it: keep-last pruning would keep the old run's higher step, and a kill
    would leave its manifest beside a half-trained model."""
    out.mkdir(parents=True, exist_ok=True)
    resuming = bool(cfg.resume) and ckpt_io.find_resumable(state_root) is not None
    if not resuming:
        removed = [name for name in RUN_FILES if (out / name).exists()]
        for name in removed:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if removed:
            log.info("%s: a fresh start; removed the earlier run's %s", out, ", ".join(removed))
    return resuming


def record_config(out: Path, cfg: Any, resuming: bool) -> None:
    """Write ``out/config.yaml`` (and on a fresh start ``out/inputs.json``, the content hash of
    every data file), first refusing to resume a fine-tune that was started with another config
    or other data (``pilelm.training.resume``, as ``pilelm train`` refuses): a resumed run must
    reproduce an uninterrupted one; how long and how visibly it runs may change. The manifest
    goes only after that check: a refused resume leaves the finished run as it was."""
    from pilelm.training.resume import (
        input_file_differences,
        record_input_files,
        refuse_resume,
        saved_config_differences,
    )

    if resuming:
        problems = saved_config_differences(out / CONFIG_FILE, cfg, FINETUNE_NEUTRAL)
        problems += input_file_differences(out, input_files(cfg))
        refuse_resume(out, "a fine-tune started with another config or other data", problems,
                      "Rerun with resume=false to train anew there, or give a new -o")
    clear_manifest(out)  # training (on): the dir is unfinished until the new manifest lands
    atomic_write_text(out / CONFIG_FILE, dump_yaml(cfg))
    if not resuming:
        record_input_files(out, input_files(cfg))


def planned_steps(loop: Any, n: int, drop_last: bool = False) -> int:
    """The steps a fine-tune runs over ``n`` training items: ``loop.max_steps``, or with
    ``loop.epochs`` the first reached of the two budgets (as ``pilelm train`` ends at its
    first budget)."""
    if not loop.epochs:
        return loop.max_steps
    steps = max(1, math.ceil(loop.epochs * steps_per_epoch(n, loop.batch_size, drop_last)))
    if steps > loop.max_steps:
        log.warning("loop.epochs=%g is %d steps; loop.max_steps=%d ends the run first (raise it to train "
                    "every epoch)", loop.epochs, steps, loop.max_steps)
    return min(steps, loop.max_steps)


class ValidatedLoop:
    """The fine-tuning engine. A task plugs in what a step is made of (``batch_loss`` over the
    items the shared batch order picks), how it is validated (``validation_metric``) and how its
    model is saved (``save_best``, ``save_weights_to``); the loop owns the rest: the schedule,
    the batch order, clipping, validation, early stopping, checkpoints, resume, stop requests."""

    cfg: Any
    """A ``FinetuneConfig`` (its ``loop``, ``optim`` and ``schedule`` sections drive this class)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    out: Path
    state_root: Path
    """The folder whose ``checkpoints/`` holds the training states."""
    metric_name = "metric"
    """What ``validation_metric`` measures, for the log."""
    num_items = 0
    """Training items the batch order draws from (examples, packed rows, pairs)."""
    item_lengths: np.ndarray | None = None
    """Lengths of the items for ``loop.group_by_length``; None = plain shuffled batches."""
    drop_last = False
    """Whether an epoch ends at its last whole batch (contrastive: no pair twice in a batch)."""
    total_steps = 0
    """Steps of the run (``planned_steps``); the schedule spans them."""
    state_keys: tuple[str, ...] = ("step", "best", "best_step", "bad_evals", "done", "examples_seen")
    """The progress a checkpoint keeps besides weights, optimizer and RNG."""

    def init_progress(self) -> None:
        self.step, self.best, self.best_step, self.bad_evals = 0, -math.inf, 0, 0
        self.done, self.preempted = False, False
        self.examples_seen, self.train_seconds = 0, 0.0
        self.total_steps = planned_steps(self.cfg.loop, self.num_items, self.drop_last)

    # --- provided by the task ---------------------------------------------------------------

    def batch_loss(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        """(loss, examples) of the training items ``idx``, the model in train mode."""
        raise NotImplementedError

    def validation_metric(self) -> tuple[float, dict[str, Any]]:
        """(the metric, higher is better; extra fields for metrics.jsonl)."""
        raise NotImplementedError

    def save_best(self) -> None:
        raise NotImplementedError

    def save_weights_to(self, d: Path) -> None:
        raise NotImplementedError

    def has_validation(self) -> bool:
        return True

    # --- shared -----------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to keep: fp32 masters if any, adapters merged."""
        if self.cfg.lora.r:
            from pilelm.finetune.lora import merged_state

            return merged_state(self.model)
        return self.precision.model_state(self.model)

    def train_step(self) -> float:
        """One optimizer step on the batch the shared order gives this step; returns its loss."""
        loop = self.cfg.loop
        self.model.train()
        set_lr(self.optimizer, lr_multiplier(self.step, self.total_steps, self.cfg.schedule))
        idx = batch_indices(self.step, loop.batch_size, self.num_items, loop.seed,
                            self.item_lengths if loop.group_by_length else None, self.drop_last)
        loss, examples = self.batch_loss(idx)
        return self.update(loss, examples)

    def update(self, loss: torch.Tensor, examples: int) -> float:
        """Backward, clip (optim.grad_clip), optimizer step; counts the step and its examples."""
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"step {self.step + 1}: training loss is {value}; lower optim.lr")
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.examples_seen += examples
        return value

    def save(self) -> None:
        d = ckpt_io.checkpoint_dir(self.state_root, self.step)
        shutil.rmtree(d, ignore_errors=True)
        self.save_weights_to(d)
        ckpt_io.save_torch(d / ckpt_io.TRAIN_STATE,
                           {"optimizer": self.optimizer.state_dict()} | {k: getattr(self, k) for k in self.state_keys})
        ckpt_io.save_torch(d / ckpt_io.rng_file(0), {"cpu": torch.get_rng_state()})
        ckpt_io.finalize_checkpoint(d)
        ckpt_io.prune_checkpoints(self.state_root, keep_last=1)

    def resume(self) -> None:
        found = ckpt_io.find_resumable(self.state_root) if self.cfg.resume else None
        if found is None:
            return
        step, d = found
        from safetensors.torch import load_file

        self.precision.load_model_state(self.model, load_file(str(d / "model.safetensors")))
        state = ckpt_io.load_torch(d / ckpt_io.TRAIN_STATE)
        self.optimizer.load_state_dict(state["optimizer"])
        for key in self.state_keys:
            setattr(self, key, state[key])
        torch.set_rng_state(ckpt_io.load_torch(d / ckpt_io.rng_file(0))["cpu"])
        log.info("resumed from %s (step %d, best %s %.4f at step %d)", d, step, self.metric_name, self.best,
                 self.best_step)

    def validate(self, metrics_log: MetricsLog) -> None:
        if not self.has_validation():  # nothing to choose by: the newest model is the best
            self.best_step = self.step
            self.save_best()
            return
        main, extra = self.validation_metric()
        if not math.isfinite(main):
            raise FloatingPointError(f"step {self.step}: validation {self.metric_name} is {main}; lower optim.lr")
        if main > self.best + self.cfg.loop.min_delta:
            self.best, self.best_step, self.bad_evals = main, self.step, 0
            self.save_best()
        else:
            self.bad_evals += 1
        metrics_log.write({"step": self.step, "val_metric": main} | extra)
        log.info("step %d: val %s %.4f (best %.4f at step %d)", self.step, self.metric_name, main, self.best,
                 self.best_step)
        patience = self.cfg.loop.patience
        if patience and self.bad_evals >= patience:
            log.info("early stop: %d validations without improvement", self.bad_evals)
            self.done = True

    def fit(self, desc: str) -> None:
        loop, total = self.cfg.loop, self.total_steps
        self.resume()
        metrics_log = MetricsLog(self.out, self.step, True, loop.tensorboard, loop.trackers, self.cfg)
        bar = tqdm(total=total, initial=self.step, desc=desc, unit="step", disable=None)
        t0, seen0 = time.perf_counter(), self.examples_seen
        try:
            while not self.done and self.step < total:
                loss = self.train_step()
                bar.update(1)
                if self.step % loop.log_every == 0:
                    rate = (self.examples_seen - seen0) / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
                    metrics_log.write({"step": self.step, "loss": loss, "examples_per_s": rate,
                                       "lr": self.optimizer.param_groups[0]["lr"]})
                if self.step % loop.eval_every == 0 or self.step == total:
                    self.validate(metrics_log)  # may stop early: ``done`` (reaching ``total`` is not:
                    self.save()                  # a rerun with more steps trains on, as train's)
                if loop.stop_at_step and self.step >= loop.stop_at_step and not (self.done or self.step >= total):
                    self.save()
                    self.preempted = True
                    log.info("stopped at step %d (loop.stop_at_step); rerun the same command to resume", self.step)
                    break
        finally:
            bar.close()
            metrics_log.close()
        self.train_seconds = time.perf_counter() - t0
