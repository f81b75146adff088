"""The compression table at GPT-2 124M shape with trained weights.

``compress_decode.py`` times decoding at this shape with random weights, which says nothing
about what a method costs in bits per byte. This benchmark trains the shape first and then
runs every method as the stages a user would, ending in one ``pilelm compress report``:

1. data: ``../shared/minipile`` train through the default ``pilelm prepare``, a byte-level BPE
   of GPT-2's vocabulary size (50257) trained on it, token shards; minipile's val split
   prepared with the filters off, tokenized with the same BPE (scored for BPB);
2. base: ``pilelm train --config gpt2-124m`` (12 layers, d=768, 12 heads, context 1024, the
   cpu-10min recipe) for ``--base-steps`` steps of ``--micro-batch`` x 1024 tokens;
3. ``pilelm quantize`` int8-weight, int8-dynamic, int4-weight (LM head included);
4. ``pilelm prune`` structured, half the heads and half the MLP channels by Taylor importance,
   before and after a recovery fine-tune of ``--recovery-steps``; the recovered model with
   int8-dynamic on top;
5. ``pilelm distill`` a half-depth student (6 layers, the teacher's optimizer and schedule) for
   ``--student-steps``, and the same student trained alone for the same steps on the same windows;
6. ``pilelm compress report`` over all of them: parameters, bytes, val BPB (first
   ``--max-documents`` documents, per component), greedy decode tok/s at batch 1 and 8.

Every stage is cached in ``--work-dir`` (rerun to resume, finished stages are skipped). The last
lines print the issue's targets (int8 weight-only BPB and speed, pruning + recovery speed and
BPB cost, distilled vs alone). Hours of a 2-core CPU at the defaults' full scale; the defaults
here are a short run (a few thousand steps would be needed for a well-trained 124M model).

    python benchmarks/compress_124m.py [--base-steps 60] [--student-steps 30] [--recovery-steps 16] [--stages-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from quality_10min import MINIPILE, build_data  # minipile -> prepare -> BPE -> shards (benchmarks/)

from pilelm.compress.report import CompressReportConfig, run_compress_report
from pilelm.core.runner import run_stage
from pilelm.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 1024
TINY = {"n_layer": 2, "n_head": 2, "d_model": 64}


def loop_section(steps: int, args: argparse.Namespace) -> dict[str, Any]:
    return {"max_steps": steps, "micro_batch": args.micro_batch, "tokens_per_step": args.micro_batch * CONTEXT,
            "compile": False, "precision": "auto", "eval_every": steps, "eval_windows": 8, "save_every": 20,
            "log_every": 5, "tensorboard": False, "num_threads": args.threads}


def train_base(shards: Path, out: Path, args: argparse.Namespace) -> Path:
    return run_stage("train", config="gpt2-124m", data=str(shards), output=str(out), model=TINY if args.tiny else {},
                     schedule={"warmup_steps": max(5, args.base_steps // 20)}, loop=loop_section(args.base_steps, args))


def distill_and_alone(base: Path, shards: Path, work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    teacher = load_run_config(base)
    student, alone = work / "student", work / "alone"
    run_stage("distill", teacher=str(base), data=str(shards), output=str(student),
              optim={k: getattr(teacher.optim, k) for k in ("name", "lr", "muon_lr", "beta2", "weight_decay")},
              schedule={"kind": teacher.schedule.kind, "decay_frac": teacher.schedule.decay_frac,
                        "warmup_steps": max(3, args.student_steps // 20)},
              loop={**loop_section(args.student_steps, args), "window_start": teacher.loop.window_start},
              distill={"student_layers": teacher.model_config.n_layer // 2, "temperature": args.temperature,
                       "kl_weight": args.kl_weight, "lm_weight": 1.0 - args.kl_weight})
    run_stage("train", config=student / "config.yaml", output=str(alone))
    return student, alone


def ratio_line(name: str, value: float, target: float, higher: bool = True) -> str:
    met = value >= target if higher else value <= target
    return f"target {name} {'>=' if higher else '<='} {target:g}: {value:.4g} -> {'met' if met else 'missed'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minipile", type=Path, default=MINIPILE)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "compress_124m")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--base-steps", type=int, default=60)
    ap.add_argument("--student-steps", type=int, default=30)
    ap.add_argument("--recovery-steps", type=int, default=16)
    ap.add_argument("--recovery-lr", type=float, default=1e-4)
    ap.add_argument("--micro-batch", type=int, default=4, help="windows of 1024 tokens per step")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kl-weight", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-documents", type=int, default=20, help="val documents scored for BPB")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages-only", action="store_true",
                    help="make every run but not the report (whose decode timing wants a quiet machine)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d=64 model instead (a quick check of the pipeline)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.minipile.is_dir():
        raise SystemExit(f"minipile not found at {args.minipile} (--minipile PATH)")
    torch.set_num_threads(args.threads)
    work = args.work_dir
    shards, val = build_data(work, args.minipile, vocab=args.vocab)
    base = train_base(shards, work / "base", args)
    runs = {"base (bf16)": base}
    for method in ("int8-weight", "int8-dynamic", "int4-weight"):
        runs[method] = run_stage("quantize", run=str(base), output=str(work / method), method=method)
    pruned = run_stage("prune", run=str(base), output=str(work / "pruned-recovered"), method="structured", heads=0.5,
                       channels=0.5, importance="taylor", data=str(shards), recovery_steps=args.recovery_steps,
                       recovery_lr=args.recovery_lr, recovery_micro_batch=args.micro_batch)
    runs["pruned 50 %, no recovery"] = pruned / "pruned"
    runs["pruned 50 % + recovery"] = pruned
    runs["pruned + recovery, int8-dynamic"] = run_stage("quantize", run=str(pruned), output=str(work / "pruned-int8d"),
                                                        method="int8-dynamic")
    student, alone = distill_and_alone(base, shards, work, args)
    runs["distilled half-depth student"], runs["the same student alone"] = student, alone
    if args.stages_only:
        return
    report = run_compress_report(CompressReportConfig(
        runs=[str(r) for r in runs.values()], data=str(val), split="val", output=str(work / "report"),
        max_documents=args.max_documents, new_tokens=args.new_tokens, repeats=args.repeats))
    rows = json.loads((report / "report.json").read_text())["rows"]
    print(f"\nGPT-2 124M shape, {args.base_steps} steps of {args.micro_batch} x {CONTEXT} tokens; val BPB on the first "
          f"{args.max_documents} val documents; decode greedy, prompt 32, {args.new_tokens} new tokens, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}\n")
    print("| run | parameters | MB on disk | val BPB | vs base | tok/s b1 | vs base | tok/s b8 | vs base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    by_name = dict(zip(runs, rows, strict=True))
    ref = by_name["base (bf16)"]
    for name, r in by_name.items():
        print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['bytes'] / 1e6:.0f} | {r['bpb']:.4f} | "
              f"{100 * (r['bpb'] / ref['bpb'] - 1):+.2f} % | {r['tok_s']['1']:.1f} | {r['tok_s']['1'] / ref['tok_s']['1']:.2f}x | "
              f"{r['tok_s']['8']:.1f} | {r['tok_s']['8'] / ref['tok_s']['8']:.2f}x |")
    w8, pr = by_name["int8-weight"], by_name["pruned 50 % + recovery"]
    s, a = by_name["distilled half-depth student"], by_name["the same student alone"]
    print()
    print(ratio_line("int8-weight BPB increase (%)", 100 * (w8["bpb"] / ref["bpb"] - 1), 1.0, higher=False))
    print(ratio_line("int8-weight decode b1 vs bf16 (x)", w8["tok_s"]["1"] / ref["tok_s"]["1"], 1.5))
    print(ratio_line("pruned 50 % + recovery decode b1 vs bf16 (x)", pr["tok_s"]["1"] / ref["tok_s"]["1"], 1.5)
          + f"; its BPB cost {100 * (pr['bpb'] / ref['bpb'] - 1):+.2f} %")
    print(ratio_line("distilled / alone BPB", s["bpb"] / a["bpb"], 1.0, higher=False))


if __name__ == "__main__":
    main()
