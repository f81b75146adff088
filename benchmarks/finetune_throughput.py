"""Fine-tuning throughput: `pilelm finetune` against transformers' `Trainer`, side by side.

Both fine-tune the same pretrained model on the same token ids with the same batch size,
steps, optimizer (AdamW, lr, betas, weight decay), schedule (warmup + cosine) and precision
(bf16 autocast on CPU, the Trainer's ``bf16=True``), one after the other in one process; then
both are scored on the same test examples with pilelm's metric code. Reported per task:
training examples/s of each, their ratio, and the test metric of each.

- The model: a GPT-2 (4 layers, d=256, the demo's shape) with the sample's 4096-token BPE,
  briefly pretrained on the bundled sample (``--pretrain-steps``), exported with
  `pilelm export`; transformers loads that folder with a fresh head
  (``AutoModelFor{Sequence,Token}Classification``), pilelm reads the run directly.
- classify: the Pile component of each document of the bundled sample (8 labels; the prepared
  dir's document-level splits; the first ``--max-length`` tokens of each document).
- ner: a silver set from the same documents (no annotated corpus ships with a registry
  package we use): runs of 32 words; a capitalised word that does not start a sentence is an
  entity word (``B-CAP``, ``I-CAP`` when it follows one), a number is ``B-NUM``.

    python benchmarks/finetune_throughput.py [--steps 150] [--batch 16] [--tasks classify,ner]

Not part of CI; the figures go in the README's Fine-tuning section.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from pilelm.core.config import load_config
from pilelm.core.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pilelm" / "sample"


def silver_ner(prepared: Path, out_dir: Path, words: int = 32) -> dict[str, Path]:
    """JSONL {tokens, tags} per split of a prepared dir, by the rule in the module docstring."""
    from pilelm.data.prepared import split_files
    from pilelm.finetune.punct import strip_word
    from pilelm.finetune.records import read_text_records

    out = {}
    for split in ("train", "val", "test"):
        path = out_dir / f"ner_{split}.jsonl"
        out[split] = path
        if path.is_file():
            continue
        lines = []
        for f in split_files(prepared, split):
            for rec in read_text_records(f, "text", "text"):
                toks = rec.text.split()
                for i in range(0, min(len(toks), 20 * words), words):
                    chunk, tags, prev = toks[i:i + words], [], "O"
                    for j, tok in enumerate(chunk):
                        core, _ = strip_word(tok)
                        starts_sentence = j == 0 or chunk[j - 1][-1:] in ".!?"
                        if core.isdigit():
                            tag = "B-NUM"
                        elif core[:1].isupper() and not starts_sentence:
                            tag = "I-CAP" if prev in ("B-CAP", "I-CAP") else "B-CAP"
                        else:
                            tag = "O"
                        tags.append(tag)
                        prev = tag
                    lines.append(json.dumps({"tokens": chunk, "tags": tags}))
        path.write_text("\n".join(lines) + "\n")
    return out


def base_run(work: Path, pretrain_steps: int) -> tuple[Path, Path, Path]:
    prep = run_stage("prepare", inputs=[str(SAMPLE / "train"), str(SAMPLE / "val.jsonl.zst"),
                                        str(SAMPLE / "test.jsonl.zst")], output=str(work / "prepared"))
    tok = run_stage("tokenizer train", data=str(prep), output=str(work / "tokenizer"), kind="bpe", vocab_size=4096)
    shards = run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / "shards"))
    run = run_stage("train", data=str(shards), output=str(work / "run"),
                    model={"arch": "gpt2", "block_size": 256, "n_layer": 4, "n_head": 4, "d_model": 256},
                    optim={"lr": 2e-3}, schedule={"warmup_steps": 10},
                    loop={"max_steps": pretrain_steps, "micro_batch": 16, "precision": "bf16-autocast",
                          "eval_every": 0, "save_every": pretrain_steps, "tensorboard": False})
    hf = run_stage("export", run=str(run), output=str(work / "hf"))
    return prep, run, hf


def pilelm_side(cfg, steps: int):
    from pilelm.finetune.stage import Finetuner, predict, score

    ft = Finetuner(cfg)
    t0 = time.perf_counter()
    for _ in range(steps):
        ft.train_step()
    seconds = time.perf_counter() - t0
    pred = predict(ft.model, ft.data.examples["test"], cfg.loop.eval_batch_size, ft.precision, ft.device)
    return ft, steps * cfg.loop.batch_size / seconds, score(ft.task, ft.data, "test", pred)


def trainer_side(ft, hf_dir: Path, cfg, steps: int, work: Path):
    """transformers' Trainer on the same examples (token ids, labels) and hyperparameters."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    from pilelm.finetune.encoding import Encoded, collate
    from pilelm.finetune.stage import score
    from pilelm.training.precision import resolve_precision

    labels = ft.data.labels
    auto = AutoModelForSequenceClassification if ft.task.kind == "sequence" else AutoModelForTokenClassification
    model = auto.from_pretrained(hf_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={x: i for i, x in enumerate(labels)}, pad_token_id=ft.encoder.pad_id)
    pad = ft.encoder.pad_id
    train = [{"ids": e.ids, "label": e.label} for e in ft.data.examples["train"]]

    def collator(rows: list[dict]) -> dict[str, torch.Tensor]:
        b = collate([Encoded(r["ids"], r["label"]) for r in rows], pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

    args = TrainingArguments(
        output_dir=str(work / f"trainer_{ft.task.name}"), per_device_train_batch_size=cfg.loop.batch_size,
        max_steps=steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, warmup_steps=cfg.schedule.warmup_steps, lr_scheduler_type="cosine",
        bf16=True, use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50,
        dataloader_num_workers=0, seed=cfg.loop.seed, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    out = trainer.train()
    rate = steps * cfg.loop.batch_size / out.metrics["train_runtime"]
    # Scored with the same batching and metric code as pilelm's side.
    model.eval()
    precision = resolve_precision("bf16-autocast", torch.device("cpu"))
    preds = []
    test = ft.data.examples["test"]
    with torch.no_grad(), precision.autocast():
        for i in range(0, len(test), 64):
            b = collate(test[i:i + 64], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            for row in range(len(logits)):
                preds.append(int(logits[row]) if ft.task.kind == "sequence"
                             else logits[row][b["labels"][row] != -100].tolist())
    return rate, score(ft.task, ft.data, "test", preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="runs/bench_finetune")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    ap.add_argument("--tasks", default="classify,ner")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prep, run, hf = base_run(work, args.pretrain_steps)
    ner = silver_ner(prep, work)

    from pilelm.finetune.config import FinetuneConfig

    rows = []
    print(f"fine-tuning, {args.steps} steps x {args.batch} examples, max_length {args.max_length}, "
          f"bf16 autocast, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    print(f"{'task':<9} {'pilelm ex/s':>12} {'Trainer ex/s':>13} {'ratio':>6}   {'test metric':<11} "
          f"{'pilelm':>7} {'Trainer':>8}", flush=True)
    for task in args.tasks.split(","):
        data = {"data": [str(prep)], "label_column": "meta.pile_set_name"} if task == "classify" else {
            "data": [str(ner["train"])], "val_data": [str(ner["val"])], "test_data": [str(ner["test"])]}
        cfg = load_config(FinetuneConfig, overrides={
            "run": str(run), "task": task, "output": str(work / f"ft_{task}"), "max_length": args.max_length,
            "max_eval_examples": 400, "optim": {"lr": args.lr},
            "loop": {"batch_size": args.batch, "max_steps": args.steps, "precision": "bf16-autocast"}, **data})
        ft, ours, our_metric = pilelm_side(cfg, args.steps)
        theirs, their_metric = trainer_side(ft, hf, cfg, args.steps, work)
        rows.append({"task": task, "train_examples": len(ft.data.examples["train"]),
                     "test_examples": len(ft.data.examples["test"]), "pilelm_examples_per_s": ours,
                     "trainer_examples_per_s": theirs, "speedup": ours / theirs,
                     "pilelm_test": our_metric["main"], "trainer_test": their_metric["main"],
                     "metric": "macro-F1" if task == "classify" else "entity F1"})
        r = rows[-1]
        print(f"{r['task']:<9} {r['pilelm_examples_per_s']:>12.1f} {r['trainer_examples_per_s']:>13.1f} "
              f"{r['speedup']:>5.2f}x   {r['metric']:<11} {r['pilelm_test']:>7.4f} {r['trainer_test']:>8.4f}",
              flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
