"""``pilelm finetune``: adapt a pretrained run to a task, keep the best checkpoint, test it.

Output (``FT_DIR``):

    manifest.json           stage "finetune", written last
    config.yaml             the resolved config
    tokenizer/              the run's tokenizer
    best/                   the checkpoint with the best validation metric (model.safetensors,
                            model.json, head.json): what `pilelm punctuate` reads and
                            `pilelm export` writes out; LoRA adapters are merged into it
    checkpoints/step_N/     the newest training state (weights, optimizer, early-stopping
                            state, RNG) to resume from after a kill
    metrics.jsonl           train loss and examples/s every log_every steps, validation
                            metrics every eval_every steps; also tensorboard/
    results.json, results.md, curves.png, confusion.png (classify)

Validation runs every ``loop.eval_every`` steps; after ``loop.patience`` validations without
a better metric training stops. The batches of step s are a function of (seed, s) alone, so a
resumed run draws the same batches as an uninterrupted one; with ``loop.group_by_length`` (the
default) each batch holds examples of similar length, so batches pad little.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pilelm.core.atomic import atomic_write_json
from pilelm.core.manifest import require_stage, write_manifest
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.encoding import IGNORE, Encoded, TaskEncoder, collate
from pilelm.finetune.loop import ValidatedLoop, open_output, record_config
from pilelm.finetune.model import HeadSpec, TaskModel, build_task_model, resolve_pooling, save_task_model
from pilelm.finetune.tasks import TASKS, Task, TaskData
from pilelm.models import spec_for
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.distributed import pick_device
from pilelm.training.optim import build_optimizer
from pilelm.training.precision import Precision, resolve_precision

log = logging.getLogger(__name__)

BEST = "best"


def predict(model: TaskModel, examples: list[Encoded], batch_size: int, precision: Precision,
            device: torch.device) -> list[Any]:
    """Argmax label ids: one per example (sequence head) or one per kept word (token head)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))  # little padding
    out: list[Any] = [None] * len(examples)
    with torch.no_grad(), precision.autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], model.head.pad_id)
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            pred = logits.argmax(-1).cpu()
            for row, i in enumerate(idx):
                if model.head.kind == "sequence":
                    out[i] = int(pred[row])
                else:
                    first = batch["labels"][row] != IGNORE
                    out[i] = pred[row][first].tolist()
    return out


def score(task: Task, data: TaskData, split: str, pred: list[Any]) -> dict[str, Any]:
    """The task's metrics of ``pred`` against the split's gold answers. Token tasks: words cut
    off by truncation get the no-entity / no-mark label, so they count as misses."""
    gold = data.gold[split]
    if task.kind == "sequence":
        return task.score(gold, pred, data.labels)
    fill = "O" if "O" in data.labels else data.labels[0]
    names = [[data.labels[i] for i in p] + [fill] * (len(g) - len(p)) for p, g in zip(pred, gold, strict=True)]
    return task.score(gold, names, data.labels)


class Finetuner(ValidatedLoop):
    def __init__(self, cfg: FinetuneConfig):
        if not cfg.run or not cfg.output or not cfg.data:
            raise ValueError("finetune needs a run, data and an output: "
                             "pilelm finetune RUN_DIR --task classify --data FILES -o FT_DIR")
        require_stage(cfg.run, "train", "import", what="run")
        loop = cfg.loop
        if loop.num_threads:
            torch.set_num_threads(loop.num_threads)
        self.cfg, self.task, self.out = cfg, TASKS[cfg.task], Path(cfg.output)
        self.device = pick_device(loop.device)
        from pilelm.tokens.tokenizer import load_tokenizer

        trunk, trunk_cfg, tok_dir = ckpt_io.load_for_inference(cfg.run)
        self.tok_dir = Path(tok_dir)
        spec = spec_for(trunk_cfg)
        max_length = min(cfg.max_length, trunk_cfg.block_size)
        self.encoder = TaskEncoder(load_tokenizer(tok_dir), spec.causal, max_length)
        t0 = time.perf_counter()
        self.data = self.task.load(cfg, self.encoder)
        self.num_items = len(self.data.examples["train"])
        self.item_lengths = np.array([len(e.ids) for e in self.data.examples["train"]])
        self.load_seconds = time.perf_counter() - t0
        pooling = resolve_pooling(cfg.head.pooling, spec.causal) if self.task.kind == "sequence" else "none"
        head = HeadSpec(self.task.name, self.task.kind, self.data.labels, pooling, self.encoder.pad_id,
                        max_length, self.data.scheme)
        torch.manual_seed(loop.seed)
        self.model = build_task_model(trunk_cfg, head, cfg.head.dropout, trunk.state_dict())
        del trunk
        if cfg.lora.r:
            from pilelm.finetune.lora import add_lora

            add_lora(self.model, spec.family, cfg.lora)
        from pilelm.finetune.lora import trainable_parameters

        self.trainable, self.total = trainable_parameters(self.model)
        self.precision = resolve_precision(loop.precision, self.device)
        self.model.to(self.device)
        self.precision.prepare_model(self.model)
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.model, cfg.optim), self.model)
        self.state_root = self.out
        self.metric_name = _metric_name(cfg.task)
        self.init_progress()

    # --- checkpoints -----------------------------------------------------------------------

    def save_best(self) -> None:
        tmp, best, old = self.out / ".best.tmp", self.out / BEST, self.out / ".best.old"
        shutil.rmtree(tmp, ignore_errors=True)
        save_task_model(tmp, self.model, self.weights())
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)

    def save_weights_to(self, d: Path) -> None:
        save_task_model(d, self.model, self.precision.model_state(self.model))

    def resume(self) -> None:
        best_old = self.out / ".best.old"
        if not (self.out / BEST).exists() and best_old.exists():
            os.replace(best_old, self.out / BEST)  # killed between the two renames of save_best
        super().resume()

    # --- the loop --------------------------------------------------------------------------

    def batch_loss(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        train = self.data.examples["train"]
        batch = {k: v.to(self.device) for k, v in collate([train[i] for i in idx], self.encoder.pad_id).items()}
        with self.precision.autocast():
            logits = self.model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["labels"].reshape(-1),
                               ignore_index=IGNORE)
        return loss, len(idx)

    def evaluate(self, split: str) -> dict[str, Any]:
        pred = predict(self.model, self.data.examples[split], self.cfg.loop.eval_batch_size, self.precision,
                       self.device)
        return score(self.task, self.data, split, pred)

    def validation_metric(self) -> tuple[float, dict[str, Any]]:
        result = self.evaluate("val")
        return result["main"], {f"val_{k}": v for k, v in result.items() if isinstance(v, float) and k != "main"}


def _metric_name(task: str) -> str:
    return {"classify": "macro-F1", "ner": "entity F1", "punct": "(mark micro-F1 + case F1) / 2"}.get(task, "metric")


def run_finetune(cfg: FinetuneConfig) -> Path:
    from pilelm.finetune.model import load_task_model
    from pilelm.finetune.results import write_results
    from pilelm.tokens.tokenizer import copy_tokenizer

    own_loop = TASKS[cfg.task].load_runner()
    if own_loop is not None:
        return own_loop(cfg)
    ft = Finetuner(cfg)
    out = ft.out
    resuming = open_output(out, ft.state_root, cfg)
    record_config(out, cfg, resuming)
    if not (out / "tokenizer").is_dir():  # a fresh start removed the old run's
        copy_tokenizer(ft.tok_dir, out / "tokenizer")
    ft.fit(f"finetune {ft.task.name}")
    if ft.preempted:
        return out
    best = load_task_model(out / BEST, ft.device)
    results: dict[str, Any] = {"task": cfg.task, "metric": _metric_name(cfg.task), "best_step": ft.best_step,
                               "best_val": ft.best, "steps": ft.step, "labels": list(ft.data.labels),
                               "trainable_parameters": ft.trainable, "parameters": ft.total,
                               "lora_r": cfg.lora.r, "head": asdict(best.head)}
    ft.model = best
    for split in ("val", "test"):
        if ft.data.examples.get(split):
            results[split] = ft.evaluate(split)
    from pilelm.finetune.baselines import score_baselines

    results["baselines"] = score_baselines(ft.task, ft.data)  # the simple methods, same split
    atomic_write_json(out / "results.json", results)
    write_results(out, results)
    counts = {f"{s}_examples": len(v) for s, v in ft.data.examples.items()} | dict(ft.data.counts)
    counts |= {"steps": ft.step, "best_step": ft.best_step, "trainable_parameters": ft.trainable,
               "parameters": ft.total}
    write_manifest(out, "finetune", cfg, inputs=[cfg.run, *cfg.data, *cfg.val_data, *cfg.test_data],
                   counts=counts, timings={"load_data": ft.load_seconds, "train": ft.train_seconds},
                   extra={"task": cfg.task, "best_val": ft.best, "test_metric": results.get("test", {}).get("main")})
    log.info("fine-tuned %s: best val %.4f at step %d; test %s", cfg.task, ft.best, ft.best_step,
             f"{results['test']['main']:.4f}" if "test" in results else "-")
    return out
