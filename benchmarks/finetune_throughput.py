"""Fine-tuning throughput: `pilelm finetune` against transformers' `Trainer`, side by side.

Both fine-tune the same pretrained model on the same token ids with the same batch size,
steps, dropout (``--dropout`` in the trunk and before the head on both sides), optimizer
(AdamW, lr, betas, weight decay), schedule (warmup + cosine), precision (bf16 autocast on CPU,
the Trainer's ``bf16=True``), threads and batching (both group examples of similar length,
the Trainer's ``train_sampling_strategy="group_by_length"``; validation off on both), then
both are scored on the same test examples with pilelm's metric code.

Shared machines are noisy, so the sides alternate (pilelm, Trainer, pilelm, Trainer, ...:
``--repeats`` pairs per task, each a fresh fine-tune from the pretrained weights with seed
1337 + repeat) and the figure is the median of the per-pair ratios of training examples/s
(best-of ratio too). Each side's test metric is the median over its repeats, with the spread;
a last line per task says whether pilelm reaches >= 1.5x at an equal or better metric
(within the larger of the two spreads).

- The model: a GPT-2 (4 layers, d=256, the demo's shape) with the sample's 4096-token BPE,
  briefly pretrained on the bundled sample (``--pretrain-steps``), exported with
  `pilelm export`; transformers loads that folder with a fresh head
  (``AutoModelFor{Sequence,Token}Classification``), pilelm reads the run directly.
- classify: the Pile component of each document of the bundled sample (8 labels; the prepared
  dir's document-level splits; the first ``--max-length`` tokens of each document).
- ner: a silver set from the same documents (no annotated corpus ships with a registry
  package we use): runs of 32 words; a capitalised word that does not start a sentence is an
  entity word (``B-CAP``, ``I-CAP`` when it follows one), a number is ``B-NUM``.

    python benchmarks/finetune_throughput.py [--steps 80] [--repeats 3] [--tasks classify,ner]

Everything (the pretrained run, the data, the Trainer's folders) goes to ``--work-dir``
(default: pilelm_bench_finetune under the system temp dir; reused by later runs). Not part of
CI; the figures go in docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pilelm.core.config import load_config
from pilelm.core.runner import run_stage

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


def base_run(work: Path, pretrain_steps: int, precision: str = "bf16-autocast",
             export: bool = True) -> tuple[Path, Path, Path | None]:
    """The pretrained base (prepared sample, 4096-token BPE, 4-layer d=256 GPT-2) and, with
    ``export``, its transformers folder; ``precision="auto"`` trains in this machine's."""
    prep = run_stage("prepare", inputs=[str(SAMPLE / "train"), str(SAMPLE / "val.jsonl.zst"),
                                        str(SAMPLE / "test.jsonl.zst")], output=str(work / "prepared"))
    tok = run_stage("tokenizer train", data=str(prep), output=str(work / "tokenizer"), kind="bpe", vocab_size=4096)
    shards = run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / "shards"))
    run = run_stage("train", data=str(shards), output=str(work / "run"),
                    model={"arch": "gpt2", "block_size": 256, "n_layer": 4, "n_head": 4, "d_model": 256},
                    optim={"lr": 2e-3}, schedule={"warmup_steps": 10},
                    loop={"max_steps": pretrain_steps, "micro_batch": 16, "precision": precision,
                          "eval_every": 0, "save_every": pretrain_steps, "tensorboard": False})
    hf = run_stage("export", run=str(run), output=str(work / "hf")) if export else None
    return prep, run, hf


def pilelm_side(cfg, steps: int):
    from pilelm.finetune.stage import Finetuner, predict, score

    ft = Finetuner(cfg)
    t0 = time.perf_counter()
    for _ in range(steps):
        ft.train_step()
    seconds = time.perf_counter() - t0
    pred = predict(ft.model, ft.data.examples["test"], cfg.loop.eval_batch_size, ft.precision, ft.device)
    return ft, steps * cfg.loop.batch_size / seconds, score(ft.task, ft.data, "test", pred)["main"]


def trainer_side(ft, hf_dir: Path, cfg, steps: int, work: Path):
    """transformers' Trainer on the same examples (token ids, labels) and hyperparameters."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    from pilelm.finetune.encoding import Encoded, collate
    from pilelm.finetune.stage import predict, score
    from pilelm.training.precision import resolve_precision

    labels = ft.data.labels
    auto = AutoModelForSequenceClassification if ft.task.kind == "sequence" else AutoModelForTokenClassification
    p = cfg.head.dropout  # GPT-2's three dropouts, and the token head's, as pilelm's head.dropout
    config = AutoConfig.from_pretrained(hf_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id={x: i for i, x in enumerate(labels)}, pad_token_id=ft.encoder.pad_id,
                                        attn_pdrop=p, resid_pdrop=p, embd_pdrop=p)
    config.classifier_dropout = p
    model = auto.from_pretrained(hf_dir, config=config)
    pad = ft.encoder.pad_id
    train = [{"input_ids": e.ids, "label": e.label} for e in ft.data.examples["train"]]

    def collator(rows: list[dict]) -> dict[str, torch.Tensor]:
        b = collate([Encoded(r["input_ids"], r["label"]) for r in rows], pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

    args = TrainingArguments(
        output_dir=str(work / f"trainer_{ft.task.name}"), per_device_train_batch_size=cfg.loop.batch_size,
        max_steps=steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, warmup_steps=cfg.schedule.warmup_steps, lr_scheduler_type="cosine",
        bf16=True, use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6,
        dataloader_num_workers=0, seed=cfg.loop.seed, remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if cfg.loop.group_by_length else "random",
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    out = trainer.train()
    rate = steps * cfg.loop.batch_size / out.metrics["train_runtime"]
    # Scored with the same batching and metric code as pilelm's side.
    model.eval()

    class Logits(torch.nn.Module):  # predict() calls model(ids, mask) and reads model.head
        head = ft.model.head

        def forward(self, input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    pred = predict(Logits(), ft.data.examples["test"], cfg.loop.eval_batch_size,
                   resolve_precision("bf16-autocast", torch.device("cpu")), torch.device("cpu"))
    return rate, score(ft.task, ft.data, "test", pred)["main"]


def train_flops_per_example(model: torch.nn.Module, tokens: float) -> float:
    """6N per token over the weights that multiply (embedding lookups are not matmuls; no LM head
    runs in a fine-tune) plus attention's 12 * L * T * C (PaLM, appendix B), times ``tokens``."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    cfg = model.trunk.cfg
    return (6 * n + 12 * cfg.n_layer * tokens * cfg.d_model) * tokens


def spread(xs: list[float]) -> float:
    return max(xs) - min(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "pilelm_bench_finetune"))
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps per fine-tune")
    ap.add_argument("--repeats", type=int, default=3, help="(pilelm, Trainer) pairs per task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dropout", type=float, default=0.1, help="dropout on both sides (pilelm's default)")
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    ap.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches on both sides")
    ap.add_argument("--tasks", default="classify,ner")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    prep, run, hf = base_run(work, args.pretrain_steps)
    ner = silver_ner(prep, work)
    from pilelm.training.mfu import best_measured_flops, peak_dtype

    peak = best_measured_flops(torch.device("cpu"))
    print(f"{str(peak_dtype(torch.device('cpu'))).removeprefix('torch.')} matmul peak (best of 3 measurements): "
          f"{peak / 1e9:.0f} GFLOP/s", flush=True)

    from pilelm.finetune.config import FinetuneConfig

    rows = []
    print(f"fine-tuning, {args.repeats} x (pilelm, Trainer) alternating, {args.steps} steps x {args.batch} "
          f"examples, max_length {args.max_length}, dropout {args.dropout}, bf16 autocast, "
          f"group by length {not args.no_group_by_length}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    for task in args.tasks.split(","):
        data = {"data": [str(prep)], "label_column": "meta.pile_set_name"} if task == "classify" else {
            "data": [str(ner["train"])], "val_data": [str(ner["val"])], "test_data": [str(ner["test"])]}
        ours, theirs, our_metric, their_metric = [], [], [], []
        for r in range(args.repeats):
            cfg = load_config(FinetuneConfig, overrides={
                "run": str(run), "task": task, "output": str(work / f"ft_{task}"), "max_length": args.max_length,
                "max_eval_examples": 400, "optim": {"lr": args.lr}, "head": {"dropout": args.dropout},
                "loop": {"batch_size": args.batch, "max_steps": args.steps, "precision": "bf16-autocast",
                         "seed": 1337 + r, "group_by_length": not args.no_group_by_length}, **data})
            ft, rate, metric = pilelm_side(cfg, args.steps)
            ours.append(rate)
            our_metric.append(metric)
            rate, metric = trainer_side(ft, hf, cfg, args.steps, work)
            theirs.append(rate)
            their_metric.append(metric)
            print(f"  {task} pair {r + 1}: pilelm {ours[-1]:.1f} ex/s (metric {our_metric[-1]:.4f}), "
                  f"Trainer {theirs[-1]:.1f} ex/s (metric {their_metric[-1]:.4f}), "
                  f"ratio {ours[-1] / theirs[-1]:.2f}x, load {os.getloadavg()[0]:.2f}", flush=True)
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        noise = max(spread(our_metric), spread(their_metric))
        row = {"task": task, "train_examples": len(ft.data.examples["train"]),
               "test_examples": len(ft.data.examples["test"]), "metric": "macro-F1" if task == "classify" else
               "entity F1", "pilelm_examples_per_s": ours, "trainer_examples_per_s": theirs,
               "paired_ratios": ratios, "median_ratio": statistics.median(ratios),
               "best_ratio": max(ours) / max(theirs), "pilelm_test": our_metric, "trainer_test": their_metric,
               "metric_noise": noise}
        # Model FLOPs per example (6N + attention, real tokens only: padding is not counted).
        lengths = [len(e.ids) for e in ft.data.examples["train"]]
        mean_len = statistics.fmean(lengths)
        row["tokens_per_example"] = mean_len
        flops = train_flops_per_example(ft.model, mean_len)
        row["pilelm_mfu"] = max(ours) * flops / peak
        row["trainer_mfu"] = max(theirs) * flops / peak
        row["equal_or_better_metric"] = statistics.median(our_metric) >= statistics.median(their_metric) - noise
        rows.append(row)
    print(f"\n{'task':<9} {'pilelm ex/s':>12} {'Trainer ex/s':>13} {'median ratio':>13} {'best ratio':>11}   "
          f"{'test metric':<10} {'pilelm':>15} {'Trainer':>15}")
    for r in rows:
        m_ours, m_theirs = statistics.median(r["pilelm_test"]), statistics.median(r["trainer_test"])
        print(f"{r['task']:<9} {max(r['pilelm_examples_per_s']):>12.1f} {max(r['trainer_examples_per_s']):>13.1f} "
              f"{r['median_ratio']:>12.2f}x {r['best_ratio']:>10.2f}x   {r['metric']:<10} "
              f"{m_ours:>7.4f} +-{spread(r['pilelm_test']) / 2:.3f} {m_theirs:>7.4f} +-{spread(r['trainer_test']) / 2:.3f}")
    print(f"\nmodel FLOPs utilisation against the measured bf16 peak ({peak / 1e9:.0f} GFLOP/s; 6N + attention "
          "per real token, padding not counted):")
    for r in rows:
        print(f"  {r['task']}: {r['tokens_per_example']:.1f} tokens/example; pilelm {100 * r['pilelm_mfu']:.1f} %, "
              f"Trainer {100 * r['trainer_mfu']:.1f} %; 1.5x the Trainer would be {150 * r['trainer_mfu']:.1f} %")
    for r in rows:
        ok = r["median_ratio"] >= 1.5 and r["equal_or_better_metric"]
        print(f"target {r['task']}: {r['median_ratio']:.2f}x examples/s (>= 1.5x: "
              f"{'yes' if r['median_ratio'] >= 1.5 else 'no'}), {r['metric']} "
              f"{'equal or better' if r['equal_or_better_metric'] else 'WORSE'} (within {r['metric_noise']:.3f}) "
              f"-> {'MET' if ok else 'NOT MET'}")
    print(f"load {os.getloadavg()[0]:.2f}; ex/s columns are the best of {args.repeats}")
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
