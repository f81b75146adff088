"""What every fine-tuning loop shares: validate every N steps, keep the best, stop early,
checkpoint the training state, resume after a kill, stop on request (``loop.stop_at_step``).

A loop (``pilelm.finetune.stage.Finetuner`` for task heads, ``pilelm.finetune.sft.trainer.SftTrainer``
for chat models) subclasses ``ValidatedLoop`` and provides ``train_step`` (one optimizer step,
returns the loss), ``validation_metric`` (higher is better), ``save_best`` and
``save_weights_to`` (the model's files in a checkpoint folder). Training states live in
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
from pilelm.core.config import dump_yaml, to_dict
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.metrics_log import MetricsLog
from pilelm.training.precision import Precision

log = logging.getLogger(__name__)

_STATE_KEYS = ("step", "best", "best_step", "bad_evals", "done", "examples_seen")


# Length grouping draws each batch from a window of this many batches of the epoch's shuffled
# order sorted by length (transformers' ``LengthGroupedSampler`` uses the same 50): batches of
# similar lengths pad little, and the order stays random at the scale of windows.
GROUP_BATCHES = 50


def epoch_order(epoch: int, n: int, seed: int, lengths: np.ndarray | None = None,
                batch_size: int = 1) -> np.ndarray:
    """The examples of one epoch in training order: a seeded permutation, or with ``lengths``
    the permutation grouped by length (windows of ``GROUP_BATCHES`` batches, each sorted by
    length and cut into batches, the batches of a window in seeded random order)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None:
        return perm
    rng = np.random.default_rng([seed, epoch, 1])
    window = batch_size * GROUP_BATCHES
    out = []
    for start in range(0, n, window):
        part = perm[start:start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        out += [batches[j] for j in rng.permutation(len(batches))]
    return np.concatenate(out)


def batch_indices(step: int, batch_size: int, n: int, seed: int, lengths: np.ndarray | None = None) -> list[int]:
    """The examples of optimizer step ``step``: consecutive slices of per-epoch orders
    (``epoch_order``; grouped by length when ``lengths`` is given)."""
    out = []
    orders: dict[int, np.ndarray] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(epoch, n, seed, lengths, batch_size)
        out.append(int(orders[epoch][i]))
    return out


CONFIG_FILE = "config.yaml"


def record_config(out: Path, state_root: Path, cfg: Any) -> None:
    """Write ``out/config.yaml``, first refusing to resume a fine-tune there that was started
    with another config (as ``pilelm train`` refuses, ``pilelm.training.resume``): a resumed
    run must reproduce an uninterrupted one, so every key that shapes the weights, the data
    files among them, must be the same; how long and how visibly it runs may change."""
    import yaml

    from pilelm.training.resume import config_differences, refuse_resume

    saved = out / CONFIG_FILE
    if cfg.resume and saved.is_file() and ckpt_io.find_resumable(state_root) is not None:
        old = yaml.safe_load(saved.read_text()) or {}
        new = to_dict(cfg)
        problems = config_differences(old, new)
        # "data" is resume-neutral for train, whose shards are compared by content hash; a
        # fine-tune's data are files, compared by name.
        if [str(x) for x in old.get("data", [])] != [str(x) for x in new.get("data", [])]:
            problems.append(f"data: {old.get('data')!r} -> {new.get('data')!r}")
        refuse_resume(out, "a fine-tune started with another config", problems,
                      "Rerun with resume=false to train anew there, or give a new -o")
    atomic_write_text(saved, dump_yaml(cfg))


class ValidatedLoop:
    cfg: Any
    """A ``FinetuneConfig`` (its ``loop`` section drives this class)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    out: Path
    state_root: Path
    """The folder whose ``checkpoints/`` holds the training states."""
    metric_name = "metric"
    """What ``validation_metric`` measures, for the log."""

    def init_progress(self) -> None:
        self.step, self.best, self.best_step, self.bad_evals = 0, -math.inf, 0, 0
        self.done, self.preempted = False, False
        self.examples_seen, self.train_seconds = 0, 0.0

    # --- provided by the loop ---------------------------------------------------------------

    def train_step(self) -> float:
        raise NotImplementedError

    def validation_metric(self) -> tuple[float, dict[str, Any]]:
        """(the metric, higher is better; extra fields for metrics.jsonl)."""
        raise NotImplementedError

    def save_best(self) -> None:
        raise NotImplementedError

    def save_weights_to(self, d: Path) -> None:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to keep: fp32 masters if any, adapters merged."""
        if self.cfg.lora.r:
            from pilelm.finetune.lora import merged_state

            return merged_state(self.model)
        return self.precision.model_state(self.model)


    def update(self, loss: torch.Tensor, examples: int) -> float:
        """Backward, clip (optim.grad_clip), optimizer step; counts the step and its examples."""
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.examples_seen += examples
        return float(loss.detach())

    def save(self) -> None:
        d = ckpt_io.checkpoint_dir(self.state_root, self.step)
        shutil.rmtree(d, ignore_errors=True)
        self.save_weights_to(d)
        ckpt_io.save_torch(d / ckpt_io.TRAIN_STATE,
                           {"optimizer": self.optimizer.state_dict()} | {k: getattr(self, k) for k in _STATE_KEYS})
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
        for key in _STATE_KEYS:
            setattr(self, key, state[key])
        torch.set_rng_state(ckpt_io.load_torch(d / ckpt_io.rng_file(0))["cpu"])
        log.info("resumed from %s (step %d, best %s %.4f at step %d)", d, step, self.metric_name, self.best,
                 self.best_step)

    def validate(self, metrics_log: MetricsLog) -> None:
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
        loop = self.cfg.loop
        self.resume()
        metrics_log = MetricsLog(self.out, self.step, True, loop.tensorboard)
        bar = tqdm(total=loop.max_steps, initial=self.step, desc=desc, unit="step", disable=None)
        t0, seen0 = time.perf_counter(), self.examples_seen
        try:
            while not self.done and self.step < loop.max_steps:
                loss = self.train_step()
                bar.update(1)
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
