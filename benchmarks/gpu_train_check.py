"""GPU check of `pilelm train`: the GPT-2 124M shape for a few hundred steps on one CUDA device.

Builds token shards from the bundled sample corpus (pilelm/sample: prepare -> BPE -> tokenize,
cached under --work-dir), trains ``--config gpt2-124m`` (the cpu-10min recipe at 12 layers,
d=768, 12 heads, context 1024: bf16 autocast, torch.compile, SDPA flash attention, Muon +
AdamW) for --steps steps of --micro-batch x 1024 tokens, and reports the steady-state
tokens/s and MFU (against the device's datasheet bf16 peak when known, ``pilelm.training.mfu``,
and against its measured bf16 matmul rate), the loss curve's start and end, and a resume check:
the run is stopped half way and resumed, and the per-step losses must match an uninterrupted
run's (--no-resume-check skips it). Writes a summary to $OUT/gpu_train_check.json when $OUT is
set. Without a CUDA device it says so and exits 0 (skipped). Not part of CI.

    python benchmarks/gpu_train_check.py [--steps 300] [--micro-batch 16] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from pilelm.core.config import load_config
from pilelm.core.manifest import MANIFEST
from pilelm.core.runner import run_stage
from pilelm.core.stages import resolve_config_path
from pilelm.training.mfu import DATASHEET_BF16
from pilelm.training.precision import matmul_flops
from pilelm.training.trainer import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pilelm" / "sample"


def build_shards(work: Path, vocab: int) -> Path:
    prep = run_stage("prepare", inputs=[str(SAMPLE / "train"), str(SAMPLE / "val.jsonl.zst")],
                     output=str(work / "prepared"))
    tok = run_stage("tokenizer train", data=str(prep), output=str(work / "tokenizer"), kind="bpe", vocab_size=vocab)
    return run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / "shards"))


def config(shards: Path, out: Path, args: argparse.Namespace, **loop) -> TrainConfig:
    return load_config(TrainConfig, resolve_config_path("gpt2-124m"), overrides={
        "data": str(shards), "output": str(out),
        "schedule": {"warmup_steps": max(1, args.steps // 10)},
        "loop": {"max_steps": args.steps, "micro_batch": args.micro_batch, "tokens_per_step": 0,
                 "compile": not args.no_compile, "eval_every": args.steps, "eval_windows": 64,
                 "save_every": args.steps, "log_every": 10, "tensorboard": False, **loop},
    })


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary trained on the sample")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-resume-check", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "gpu_check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (this check runs on a GPU machine)")
        return
    logging_setup()
    name = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    shards = build_shards(args.work_dir, args.vocab)
    prep_s = time.perf_counter() - t0
    measured = matmul_flops(torch.device("cuda"), seconds=1.0)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)

    run = args.work_dir / "run"
    shutil.rmtree(run, ignore_errors=True)
    t1 = time.perf_counter()
    run_train(config(shards, run, args, peak_flops=measured))
    train_s = time.perf_counter() - t1
    metrics = rows(run)
    steady = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r][len(metrics) // 3:]  # after compile/warm-up
    tps = statistics.median(steady)
    parameters = json.loads((run / MANIFEST).read_text())["counts"]["parameters"]
    mfu_measured = statistics.median(r["mfu"] for r in metrics if "mfu" in r)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
        "steps": args.steps, "tokens_per_step": args.micro_batch * 1024, "compile": not args.no_compile,
        "tokens_per_s": round(tps), "mfu_vs_measured_bf16_matmul": round(mfu_measured, 4),
        "measured_bf16_matmul_tflops": round(measured / 1e12, 1),
        "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
        "val_loss": metrics[-1].get("val_loss"), "val_bpb": metrics[-1].get("val_bpb"),
        "parameters": parameters, "shards_s": round(prep_s, 1), "train_s": round(train_s, 1),
    }
    if datasheet:
        summary["mfu_vs_datasheet"] = round(mfu_measured * measured / datasheet, 4)

    if not args.no_resume_check:
        # Exact resume on the GPU: stop at half, resume, compare per-step losses (eager, for speed).
        check = argparse.Namespace(**{**vars(args), "steps": 40, "no_compile": True})
        a, b = args.work_dir / "resume_a", args.work_dir / "resume_b"
        for d in (a, b):
            shutil.rmtree(d, ignore_errors=True)
        run_train(config(shards, a, check, log_every=1, save_every=20, peak_flops=measured))
        run_train(config(shards, b, check, log_every=1, save_every=20, peak_flops=measured, stop_at_step=20))
        run_train(config(shards, b, check, log_every=1, save_every=20, peak_flops=measured))
        la = [(r["step"], r["loss"]) for r in rows(a)]
        lb = [(r["step"], r["loss"]) for r in rows(b)]
        summary["resume_identical"] = la == lb
        summary["resume_max_diff"] = max(abs(x[1] - y[1]) for x, y in zip(la, lb, strict=True))

    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_train_check.json").write_text(text + "\n")


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


if __name__ == "__main__":
    main()
