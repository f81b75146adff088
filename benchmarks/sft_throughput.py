"""Supervised fine-tuning throughput: `pilelm finetune --task sft` against transformers'
`Trainer`, side by side, with the same reply-only masking.

Data: lead summaries mined from the bundled sample (an encyclopedia entry's body -> its first
sentence, as ``sft.examples=lead`` mines them) with each source cut to its first
``--source-words`` words, so conversations are short and of varied length (what packing is
for), written to JSONL; rendered with the same chat template into the same token ids and the
same loss masks (prompt tokens -100) for every side. The model: the demo's GPT-2 shape (4 layers,
d=256, the sample's 4096-token BPE) briefly pretrained on the sample, grown by the three role
tokens exactly as `pilelm finetune` grows it, and exported so transformers loads the very same
weights (``AutoModelForCausalLM``).

Each side trains ``--epochs`` passes over the same training conversations with AdamW (same
lr, betas, weight decay, clip), warmup + cosine, bf16 autocast, one after the other in one
process, alternating (Trainer, pilelm padded, pilelm packed, then again: ``--repeats`` rounds);
the ratios are medians of the per-round ratios (shared machines are noisy):

- ``pilelm packed``: rows of ``--max-length`` tokens packed with several conversations
  (block-diagonal attention, so packing changes no conversation's loss), as many rows a step
  as hold ``--batch`` conversations on average;
- ``pilelm padded``: one conversation per row, ``--batch`` rows a step (the Trainer's batches);
- ``Trainer``: transformers' ``Trainer``, ``--batch`` conversations a step, right-padded,
  ``labels`` -100 outside the replies (its causal-LM loss shifts them itself).

Reported: training conversations/s of each, the ratio to the Trainer, and the mean reply loss
per token on the test conversations (teacher-forced, the same code for all three).

    python benchmarks/sft_throughput.py [--epochs 1] [--batch 16] [--max-length 256] [--max-train 0] [--repeats 2]

Everything goes to ``--work-dir`` (default: pilelm_bench_sft under the system temp dir).

Not part of CI; the figures go in docs/sft.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from finetune_throughput import SAMPLE, base_run, run_stage

from pilelm.core.config import load_config
from pilelm.core.manifest import write_manifest
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.sft.encoding import IGNORE
from pilelm.finetune.sft.stage import setup_sft
from pilelm.finetune.sft.trainer import SftTrainer, reply_loss, rows_of
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.precision import resolve_precision


def short_leads(work: Path, words: int) -> dict[str, Path]:
    """train/val/test JSONL of lead conversations from the sample, sources cut to ``words``."""
    from collections import Counter

    from pilelm.finetune.sft.conversations import mine_conversations

    files = {"train": SAMPLE / "train", "val": SAMPLE / "val.jsonl.zst", "test": SAMPLE / "test.jsonl.zst"}
    out = {}
    for split, src in files.items():
        out[split] = work / f"lead_{split}.jsonl"
        lines = []
        for c in mine_conversations("lead", [src], Counter()):
            user, reply = c.messages
            lines.append(json.dumps({"prompt": " ".join(user["content"].split(" ")[:words]),
                                     "response": reply["content"]}))
        out[split].write_text("\n".join(lines) + "\n")
    return out


def grown_hf(setup, work: Path) -> Path:
    """The grown model (role-token rows at the mean) as a run, then exported for transformers."""
    run = work / "grown_run"
    if run.exists():
        shutil.rmtree(run)
    ckpt = ckpt_io.checkpoint_dir(run, 0)
    ckpt_io.save_model(ckpt, setup.model, setup.model_cfg)
    ckpt_io.mark_complete(ckpt)
    shutil.copytree(Path(setup.cfg.output) / "tokenizer", run / "tokenizer")
    write_manifest(run, "train", {}, counts={"steps": 0})
    shutil.rmtree(work / "grown_hf", ignore_errors=True)
    return run_stage("export", run=str(run), output=str(work / "grown_hf"))


def test_loss(model, setup) -> float:
    test = setup.splits["test"]
    precision = resolve_precision("bf16-autocast", torch.device("cpu"))
    loss, _ = reply_loss(model, test, rows_of(test, setup.cfg.max_length, False, 0), 32, setup.pad_id, False,
                         precision, torch.device("cpu"))
    return loss


def pilelm_side(cfg: FinetuneConfig, packed: bool, epochs: int) -> tuple[float, float, str]:
    import dataclasses

    setup = setup_sft(cfg)
    train = setup.splits["train"]
    rows = rows_of(train, setup.cfg.max_length, packed, cfg.loop.seed)
    # Packed: as many rows a step as hold --batch conversations on average, so both sides take
    # about the same optimizer steps over the same conversations.
    batch = max(1, round(cfg.loop.batch_size * len(rows) / len(train)))
    steps = max(1, math.ceil(epochs * len(rows) / batch))
    run_cfg = dataclasses.replace(setup.cfg, loop=dataclasses.replace(setup.cfg.loop, max_steps=steps,
                                                                      batch_size=batch))
    trainer = SftTrainer(run_cfg, setup.model, setup.model_cfg, setup.splits, setup.pad_id, setup.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = time.perf_counter() - t0
    return trainer.examples_seen / seconds, test_loss(trainer.model, setup), f"{steps} steps x {batch} rows, " \
        f"{len(train) / len(rows):.2f} conversations a row"


def trainer_side(cfg: FinetuneConfig, epochs: int, work: Path) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    setup = setup_sft(cfg)
    hf_dir = grown_hf(setup, work)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pad = setup.pad_id
    train = [{"ids": e.ids, "trained": e.trained} for e in setup.splits["train"]]

    def collator(rows: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["ids"]) for r in rows)
        ids = torch.full((len(rows), T), pad)
        labels = torch.full((len(rows), T), IGNORE)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["ids"])
            ids[i, :n] = torch.tensor(r["ids"])
            labels[i, :n] = torch.tensor([t if k else IGNORE for t, k in zip(r["ids"], r["trained"], strict=True)])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    o, s = cfg.optim, cfg.schedule
    args = TrainingArguments(
        output_dir=str(work / "trainer_sft"), per_device_train_batch_size=cfg.loop.batch_size,
        num_train_epochs=epochs, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_epsilon=o.eps, max_grad_norm=o.grad_clip, warmup_steps=s.warmup_steps,
        lr_scheduler_type="cosine", bf16=True, use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=50, dataloader_num_workers=0, seed=cfg.loop.seed, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    out = trainer.train()
    rate = len(train) * epochs / out.metrics["train_runtime"]
    # Scored by the same code as pilelm's side: load the trained weights back into pilelm.
    from pilelm.interop.hf import adapter_of

    ours = setup.model
    state = adapter_of(setup.model_cfg).from_hf(setup.model_cfg, dict(model.state_dict()), str(hf_dir))
    resolve_precision("fp32", torch.device("cpu")).load_model_state(ours, state)
    return rate, test_loss(ours.eval(), setup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "pilelm_bench_sft"))
    ap.add_argument("--repeats", type=int, default=2, help="alternating (Trainer, pilelm padded, pilelm packed) rounds")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="conversations per step (padded sides)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-train", type=int, default=0, help="use at most this many training conversations")
    ap.add_argument("--source-words", type=int, default=60, help="words of each summarised text kept")
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for all sides (0 = torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _, run, _ = base_run(work, args.pretrain_steps)
    data = short_leads(work, args.source_words)

    def config(name: str, batch: int, pack: bool) -> FinetuneConfig:
        return load_config(FinetuneConfig, overrides={
            "run": str(run), "task": "sft", "output": str(work / name), "max_length": args.max_length,
            "max_train_examples": args.max_train, "max_eval_examples": 200, "optim": {"lr": args.lr},
            "data": [str(data["train"])], "val_data": [str(data["val"])], "test_data": [str(data["test"])],
            "sft": {"pack": pack},
            "loop": {"batch_size": batch, "precision": "bf16-autocast", "tensorboard": False}})

    print(f"sft on lead summaries of the sample (sources cut to {args.source_words} words), {args.epochs} "
          f"epoch(s), max_length {args.max_length}, bf16 autocast, {args.repeats} alternating repeats "
          f"(Trainer, pilelm padded, pilelm packed), {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    sides = ("Trainer", "pilelm padded", "pilelm packed")
    rates: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    shapes: dict[str, str] = {"Trainer": f"{args.batch} conversations a step"}
    for r in range(args.repeats):
        rate, loss = trainer_side(config("ft_trainer", args.batch, False), args.epochs, work)
        rates["Trainer"].append(rate)
        losses["Trainer"].append(loss)
        for name, pack in (("pilelm padded", False), ("pilelm packed", True)):
            rate, loss, shapes[name] = pilelm_side(config(name.replace(" ", "_"), args.batch, pack), pack,
                                                   args.epochs)
            rates[name].append(rate)
            losses[name].append(loss)
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.2f} conv/s" for k in sides)
              + f", load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'side':<15} {'conv/s':>8} {'median ratio':>13} {'best ratio':>11} {'test reply loss':>16}", flush=True)
    for k in sides:
        paired = statistics.median(a / b for a, b in zip(rates[k], rates["Trainer"], strict=True))
        print(f"{k:<15} {max(rates[k]):8.2f} {paired:12.2f}x {max(rates[k]) / max(rates['Trainer']):10.2f}x "
              f"{statistics.median(losses[k]):16.4f}   ({shapes[k]})", flush=True)
    paired = statistics.median(a / b for a, b in zip(rates["pilelm packed"], rates["Trainer"], strict=True))
    noise = max(max(v) - min(v) for v in losses.values())
    equal = statistics.median(losses["pilelm packed"]) <= statistics.median(losses["Trainer"]) + max(noise, 0.01)
    print(f"target sft: pilelm packed {paired:.2f}x conversations/s (>= 1.5x: {'yes' if paired >= 1.5 else 'no'}), "
          f"reply loss {'equal or better' if equal else 'WORSE'} (within {max(noise, 0.01):.3f}) -> "
          f"{'MET' if paired >= 1.5 and equal else 'NOT MET'}; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
