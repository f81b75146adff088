"""A distilled student against the same student trained alone, same steps, same data order.

Given a teacher run and its token shards: ``pilelm distill`` a student with ``--student-layers``
blocks of the teacher's shape, then ``pilelm train`` the student's own config.yaml (the same
model, optimizer, schedule, seed and data order) without the teacher, then ``pilelm compress
report TEACHER STUDENT ALONE`` on the test split: parameters, bytes, BPB (overall and per
component) and decode tok/s, each as a ratio to the teacher. The last lines print the two
students' BPB side by side.

    .venv/bin/python benchmarks/distill_vs_alone.py --teacher RUN --data SHARDS --work DIR
        [--student-layers 2] [--steps 300] [--temperature 2] [--kl-weight 0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pilelm.compress.distill import DistillConfig, run_distill
from pilelm.compress.report import CompressReportConfig, run_compress_report
from pilelm.core.config import load_config
from pilelm.core.manifest import read_manifest
from pilelm.training.config import TrainConfig, load_run_config
from pilelm.training.trainer import run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--kl-weight", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-documents", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    teacher = load_run_config(args.teacher)
    loop = {"max_steps": args.steps, "micro_batch": args.micro_batch, "eval_every": args.steps, "eval_windows": 64,
            "save_every": args.steps, "log_every": 20, "tensorboard": False, "num_threads": args.threads,
            "precision": teacher.loop.precision, "seed": teacher.loop.seed}
    student = run_distill(load_config(DistillConfig, overrides={
        "teacher": args.teacher, "data": args.data, "output": str(work / "student"),
        "model": {"block_size": teacher.model.block_size}, "optim": {"lr": args.lr},
        "schedule": {"warmup_steps": max(1, args.steps // 20)}, "loop": loop,
        "distill": {"student_layers": args.student_layers, "temperature": args.temperature,
                    "kl_weight": args.kl_weight, "lm_weight": 1.0 - args.kl_weight, "top_k": args.top_k}}))
    alone = run_train(load_config(TrainConfig, student / "config.yaml", {"output": str(work / "alone")}))
    report = run_compress_report(CompressReportConfig(
        runs=[args.teacher, str(student), str(alone)], data=args.data, output=str(work / "report"),
        max_documents=args.max_documents, new_tokens=32, repeats=2))
    print((report / "report.md").read_text())
    rows = {r["name"]: r for r in json.loads((report / "report.json").read_text())["rows"]}
    s, a = rows[student.name], rows[alone.name]
    print(f"test BPB: distilled {s['bpb']:.4f}, alone {a['bpb']:.4f}, distilled / alone = {s['bpb'] / a['bpb']:.4f}")
    vs, va = (read_manifest(r)["counts"].get("val_bpb") for r in (student, alone))
    if vs and va:
        print(f"val BPB at the last step: distilled {vs:.4f}, alone {va:.4f}, ratio {vs / va:.4f}")


if __name__ == "__main__":
    main()
