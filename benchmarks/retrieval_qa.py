"""Retrieval QA: the raw LM's pooled states, contrastively fine-tuned models and BM25 on the
same held-out StackExchange question/answer pairs (``pilelm eval --task retrieval``).

Corpus: ``../shared/minipile`` when present (555 StackExchange threads in train), else the
bundled sample (57). With minipile, one thread in ``--test-every`` (chosen by a hash of its
text) is moved out of train into a test file, so pretraining and fine-tuning never see a test
question or answer; with the sample, its own test file is the test split.

Steps (finished ones are reused from ``--output``): ``pilelm prepare`` -> BPE tokenizer ->
tokenize -> ``pilelm train`` (a small GPT: ``--layers``, ``--d-model``, context 128) -> ``pilelm finetune-contrastive`` once
per variant (pairs from the train split only) -> ``pilelm eval --task retrieval`` of every run
on the test split, with BM25 (``bm25s``) on the same pairs. Variants:

- ``mined``: the corpus's own pairs (StackExchange question -> answer; for other documents the
  first paragraph -> the rest), in-batch negatives;
- ``qa``: only the StackExchange (question, answer) pairs of the train split;
- ``qa+bm25neg``: the same pairs, each with BM25's best-scoring wrong answer as a hard negative.

Prints the table, the target line (best fine-tuned MRR@10 vs BM25's) and writes ``OUT/table-SETTINGS.md``.

    python benchmarks/retrieval_qa.py [-o runs/retrieval_qa] [--pretrain-steps 300] [--steps 200] [--lr 1e-3] [--variants qa+bm25neg]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import time
from pathlib import Path

import torch
import zstandard

from pilelm.core.atomic import atomic_write_text
from pilelm.core.runner import run_stage

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pilelm" / "sample"
MINIPILE = ROOT.parent / "shared" / "minipile"
VARIANTS = ("mined", "qa", "qa+bm25neg")


def held_out(text: str, every: int) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % every == 0


def write_zst(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        for line in lines:
            w.write(line.rstrip(b"\n") + b"\n")


def read_lines(path: Path) -> list[bytes]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as r:
        return [line for line in io.BufferedReader(r).read().splitlines() if line.strip()]


def corpus_inputs(work: Path, every: int) -> list[str]:
    """Input files of ``pilelm prepare``: minipile with held-out StackExchange threads as the
    test file, or the sample as it is."""
    if not MINIPILE.is_dir():
        return [str(SAMPLE / "train"), str(SAMPLE / "val.jsonl.zst"), str(SAMPLE / "test.jsonl.zst")]
    corpus = work / "corpus"
    if not (corpus / "test.jsonl.zst").is_file():
        test = []
        for shard in sorted((MINIPILE / "train").glob("*.jsonl.zst")):
            keep = []
            for line in read_lines(shard):
                rec = json.loads(line)
                if rec["meta"]["pile_set_name"] == "StackExchange" and held_out(rec["text"], every):
                    test.append(line)
                else:
                    keep.append(line)
            write_zst(corpus / "train" / shard.name, keep)
        write_zst(corpus / "val.jsonl.zst", read_lines(MINIPILE / "val.jsonl.zst"))
        write_zst(corpus / "test.jsonl.zst", test)
    return [str(corpus / "train"), str(corpus / "val.jsonl.zst"), str(corpus / "test.jsonl.zst")]


def qa_pair_files(prep: Path, work: Path) -> tuple[Path, Path]:
    """The train split's (question, answer) pairs, without and with a BM25 hard negative (the
    best-scoring answer of another question, as in DPR, Karpukhin et al. 2020, sec. 3.2)."""
    import numpy as np

    from pilelm.evaluation.retrieval import bm25_scores, read_qa_pairs

    plain, hard = work / "pairs_qa.jsonl", work / "pairs_qa_bm25neg.jsonl"
    if not hard.is_file():
        pairs = read_qa_pairs(str(prep), "train")
        questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
        scores = bm25_scores(questions, answers)
        np.fill_diagonal(scores, -np.inf)
        negatives = scores.argmax(axis=1)
        atomic_write_text(plain, "".join(json.dumps({"query": q, "positive": a}) + "\n" for q, a in pairs))
        atomic_write_text(hard, "".join(json.dumps({"query": q, "positive": a, "negative": answers[n]}) + "\n"
                                for (q, a), n in zip(pairs, negatives, strict=True)))
    return plain, hard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/retrieval_qa"),
                    help="work dir (everything is written here; finished stages are reused)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2, help="layers of the pretrained GPT")
    ap.add_argument("--d-model", type=int, default=128, help="width of the pretrained GPT")
    ap.add_argument("--steps", type=int, default=200, help="contrastive steps of each variant")
    ap.add_argument("--batch", type=int, default=32, help="pairs per contrastive batch")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--test-every", type=int, default=5, help="minipile: one StackExchange thread in N is held out")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work: Path = args.output.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    t0 = time.perf_counter()
    prep = run_stage("prepare", inputs=corpus_inputs(work, args.test_every), output=str(work / "prepared"))
    tok = run_stage("tokenizer train", data=str(prep), output=str(work / "tokenizer"), kind="bpe", vocab_size=4096)
    shards = run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / "shards"))
    base = run_stage("train", data=str(shards), output=str(work / "run"),
                     model={"arch": "gpt2", "block_size": 128, "n_layer": args.layers, "n_head": 4,
                            "d_model": args.d_model},
                     optim={"lr": 3e-3}, schedule={"warmup_steps": 20},
                     loop={"max_steps": args.pretrain_steps, "micro_batch": 16, "precision": "bf16-autocast",
                           "eval_every": 0, "save_every": args.pretrain_steps, "tensorboard": False})
    print(f"pretrained in {time.perf_counter() - t0:.0f} s (cumulative)", flush=True)
    plain, hard = qa_pair_files(prep, work)
    runs = {"raw LM": base}
    # Fine-tunes and the evaluation are named by their settings, so a work dir holds several.
    tag = f"s{args.steps}-b{args.batch}-t{args.temperature}-lr{args.lr}-m{args.max_tokens}"
    for variant in args.variants:
        data = {"mined": {"corpus": [str(prep)]}, "qa": {"pairs": [str(plain)]},
                "qa+bm25neg": {"pairs": [str(hard)]}}[variant]
        name = f"contrastive {variant}"
        runs[name] = run_stage("finetune-contrastive", run=str(base), output=str(work / f"ft-{variant}-{tag}"), **data,
                               steps=args.steps, batch_size=args.batch, temperature=args.temperature, lr=args.lr,
                               max_tokens=args.max_tokens, save_every=args.steps)
        print(f"{name} in {time.perf_counter() - t0:.0f} s (cumulative)", flush=True)
    ev = run_stage("eval", runs=[str(r) for r in runs.values()], task="retrieval", data=str(prep), split="test",
                   output=str(work / f"eval-{tag}-{'-'.join(args.variants)}"))
    results = json.loads((ev / "results.json").read_text())
    table = format_table(results, runs, args)
    (work / f"table-{tag}.md").write_text(table)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s; {uptime()}")


def format_table(results: dict, runs: dict[str, Path], args: argparse.Namespace) -> str:
    by_dir = {Path(r).name: name for name, r in runs.items()}  # eval names a run by its folder
    rows = {by_dir.get(name, name): m for name, m in results["runs"].items()}
    bm25 = results["baselines"]["bm25"]
    lines = [f"{results['pairs']} held-out StackExchange question/answer pairs ({results['split']} split), "
             f"each question ranked over all their answers; contrastive: {args.steps} steps, batch {args.batch}, "
             f"temperature {args.temperature}, lr {args.lr}", "",
             "| retriever | recall@1 | recall@10 | MRR@10 | MRR@10 / BM25 |", "|---|---:|---:|---:|---:|"]
    for name, m in [*rows.items(), ("BM25 (bm25s)", bm25)]:
        lines.append(f"| {name} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} "
                     f"| {m['mrr@10'] / max(bm25['mrr@10'], 1e-9):.2f}x |")
    tuned = {k: v for k, v in rows.items() if k.startswith("contrastive")}
    if tuned:
        best = max(tuned, key=lambda k: tuned[k]["mrr@10"])
        lines += ["", f"target: fine-tuned MRR@10 >= BM25's: best ({best}) {tuned[best]['mrr@10']:.3f} vs "
                      f"BM25 {bm25['mrr@10']:.3f} = {tuned[best]['mrr@10'] / max(bm25['mrr@10'], 1e-9):.2f}x "
                      f"({'met' if tuned[best]['mrr@10'] >= bm25['mrr@10'] else 'NOT met'})"]
    return "\n".join(lines) + "\n"


def uptime() -> str:
    try:
        return "load " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[1].strip()
    except (OSError, IndexError):
        return ""


if __name__ == "__main__":
    main()
