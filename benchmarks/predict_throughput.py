"""Prediction throughput: `pilelm predict` against transformers' `pipeline`, side by side.

Both classify the same texts with the same fine-tuned model on the same threads: pilelm reads
the fine-tuning directory (``Predictor``, what `pilelm predict` and ``pilelm.load(...).classify``
run), transformers reads its export (`pilelm export FT_DIR`) through
``pipeline("text-classification", ..., batch_size=B, truncation=True, max_length=L)``, which
pads each batch of texts in the order given. The figure is texts per second over the whole set
(tokenization included on both sides), each side timed ``--repeats`` times alternately (pilelm,
pipeline, pilelm, ...) on a shared machine; the ratio is that of the medians. Both sides'
labels are compared too (they must agree: the export is exact).

- The model: the shape of finetune_throughput.py's base run (a GPT-2, 4 layers, d=256, the sample's
  4096-token BPE, ``--pretrain-steps`` of pretraining), fine-tuned for a few steps to classify
  the Pile component of the sample's documents (the throughput does not depend on how well).
- The texts: the lines (``--unit paragraph``, the default: sentence- and paragraph-length
  texts of mixed lengths) or the documents (``--unit document``: every text fills the
  context, the case where sorting by length saves nothing) of the sample's test and val
  splits, cut to ``--chars`` characters and truncated to ``--max-length`` tokens by both
  sides, repeated to ``--texts``.

    python benchmarks/predict_throughput.py [--texts 1000] [--unit paragraph|document] [--threads 2]

Work files go to ``--work-dir`` (default: pilelm_bench_predict under the system temp dir). Not part of CI; the figures go in docs/use.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from finetune_throughput import base_run  # the same base run (this folder is on sys.path)

from pilelm.core.runner import run_stage


def texts_of(prepared: Path, n: int, chars: int, unit: str) -> list[str]:
    """``--unit document``: each document's first ``chars`` characters (every text fills the
    context); ``paragraph``: the documents' lines of 20 characters or more, as they come (the
    lengths of sentences and paragraphs a classifier is usually given)."""
    from pilelm.data.prepared import split_files
    from pilelm.finetune.records import read_text_records

    docs = [r.text for s in ("test", "val") for f in split_files(prepared, s) for r in read_text_records(f, "text", "text")]
    if unit == "document":
        texts = [d[:chars] for d in docs]
    else:
        texts = [line.strip()[:chars] for d in docs for line in d.splitlines() if len(line.strip()) >= 20]
    return (texts * (n // max(1, len(texts)) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--chars", type=int, default=1000)
    ap.add_argument("--unit", choices=["paragraph", "document"], default="paragraph")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "pilelm_bench_predict"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work_dir)
    # finetune_throughput.py's base run (same stages and shape) in this machine's precision
    prep, run, _ = base_run(work, args.pretrain_steps, precision="auto", export=False)
    ft = run_stage("finetune", run=str(run), task="classify", data=[str(prep)], output=str(work / "predict_cls"),
                   label_column="meta.pile_set_name", max_length=args.max_length, max_eval_examples=64,
                   loop={"max_steps": 5, "eval_every": 5, "tensorboard": False, "num_threads": args.threads})
    hf_dir = run_stage("export", run=str(ft), output=str(work / "predict_cls_hf"))
    texts = texts_of(prep, args.texts, args.chars, args.unit)
    torch.set_num_threads(args.threads)

    from transformers import pipeline

    from pilelm.finetune.predict import Predictor

    ours = Predictor(ft, "cpu", args.batch_size)
    theirs = pipeline("text-classification", model=str(hf_dir), tokenizer=str(hf_dir), device=-1,
                      batch_size=args.batch_size, truncation=True, max_length=args.max_length)
    # The model finds each text's last token by config.pad_token_id (pilelm pads with end-of-text);
    # the exported tokenizer may name another pad token (the sample's BPE has <|padding|>), and
    # padding with it would pool a pad position: pad as the config says.
    theirs.tokenizer.pad_token_id = theirs.model.config.pad_token_id
    ours.classify(texts[:64]), theirs(texts[:64])  # warm-up
    times: dict[str, list[float]] = {"pilelm": [], "pipeline": []}
    labels: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = ours.classify(texts)
        labels["pilelm"], scores["pilelm"] = [r["label"] for r in out], [r["score"] for r in out]
        times["pilelm"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = theirs(texts)
        labels["pipeline"], scores["pipeline"] = [r["label"] for r in out], [r["score"] for r in out]
        times["pipeline"].append(time.perf_counter() - t0)
    agree = sum(a == b for a, b in zip(labels["pilelm"], labels["pipeline"], strict=True)) / len(texts)
    # A briefly trained head is nearly uniform, so fp noise between batch shapes can flip a near
    # tie; the top score's largest difference says whether the two compute the same function.
    gap = max(abs(a - b) for a, b in zip(scores["pilelm"], scores["pipeline"], strict=True))
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    lengths = sorted(len(ids) for ids in ours.encoder.tok.encode_batch(texts))
    print(f"texts {len(texts)} ({args.unit}s, <= {args.chars} chars; tokens median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}, truncated to {args.max_length}), batch {args.batch_size}, "
          f"threads {args.threads}, repeats {args.repeats}; model {run.name}: GPT-2 4x256, 8 labels")
    for k in ("pilelm", "pipeline"):
        print(f"{k:>9}: {rate[k]:8.1f} texts/s  (runs: {', '.join(f'{t:.2f}s' for t in times[k])})")
    print(f"ratio pilelm / transformers.pipeline: {rate['pilelm'] / rate['pipeline']:.2f}x; "
          f"labels agree on {100 * agree:.1f}% of texts, top scores within {gap:.1e}")


if __name__ == "__main__":
    main()
