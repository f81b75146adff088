"""Training throughput: pilelm vs the Hugging Face tutorial recipe (``Trainer`` + ``GPT2LMHeadModel``).

Same GPT-2 shape on both sides (6 layers, d=384, 6 heads, context 256, vocabulary 8192,
batch 16, dropout 0), same hyperparameters (AdamW lr 1e-3, betas 0.9/0.95, weight decay 0.1,
clip 1.0, warmup then cosine), same token windows in the same order (pilelm's loader over
shards of ../shared/minipile, tokenized by pilelm with an 8192-token BPE; built once and
cached in --work-dir). Contenders: HF fp32, HF bf16 (``TrainingArguments(bf16=True)``, CPU
autocast) and pilelm (``Trainer.train_step``, ``loop.precision=auto``). They alternate in
segments of --segment steps within one process (the HF Trainer runs in a thread gated by a
callback), so load from other processes on a shared machine hits all of them alike. The
first --warmup steps of each are not timed. Prints tokens/s, the ratio to HF's faster mode,
the training loss of each over the same last steps (equal tokens), the validation loss of
each on the same held-out windows, and pilelm's MFU against the measured bf16 matmul rate.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--segment 10] [--warmup 4]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pilelm.core.config import load_config
from pilelm.core.runner import run_stage
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training.precision import matmul_flops
from pilelm.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
MINIPILE = ROOT.parent / "shared" / "minipile"
SHAPE = {"n_layer": 6, "n_head": 6, "d_model": 384, "block_size": 256}
VOCAB = 8192
BATCH = 16
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "grad_clip": 1.0}


def build_shards(work: Path) -> Path:
    """minipile's first train shard + val -> prepare -> BPE 8192 -> shards (cached)."""
    prep = run_stage("prepare", inputs=[str(MINIPILE / "train" / "00.jsonl.zst"), str(MINIPILE / "val.jsonl.zst")],
                     output=str(work / "prepared"))
    tok = run_stage("tokenizer train", data=str(prep), output=str(work / "tokenizer"), kind="bpe",
                    vocab_size=VOCAB)
    return run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / "shards"))


class Gate:
    """Lets a thread run a given number of steps, then parks it until allowed again."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowed = 0
        self.done = 0
        self.finished = False

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed += n
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.done >= self.allowed or self.finished)

    def enter_step(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done < self.allowed)

    def leave_step(self) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()


class HFContender:
    """transformers Trainer + GPT2LMHeadModel (the tutorial recipe) in a thread of its worker
    process, one step per pass of the gate."""

    def __init__(self, windows: torch.Tensor, steps: int, bf16: bool, seed: int, out: Path):
        import transformers
        from transformers import (
            GPT2Config,
            GPT2LMHeadModel,
            PrinterCallback,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )

        transformers.logging.set_verbosity_error()
        self.gate = Gate()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=VOCAB, n_positions=SHAPE["block_size"], n_embd=SHAPE["d_model"],
                            n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)
        me = self

        class Timing(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                me.gate.enter_step()
                me._t0, me._c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                me.times.append(time.perf_counter() - me._t0)
                me.cpu_times.append(time.process_time() - me._c0)
                me.gate.leave_step()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    me.losses.append(float(logs["loss"]))

        class Windows(torch.utils.data.Dataset):
            def __len__(self):
                return len(windows)

            def __getitem__(self, i):
                # GPT-2 holds 256 positions: the window's first 256 tokens, shifted inside the model.
                return {"input_ids": windows[i, :-1], "labels": windows[i, :-1]}

        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
            learning_rate=HYPER["lr"], adam_beta1=HYPER["beta1"], adam_beta2=HYPER["beta2"],
            weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["grad_clip"], lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10), bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no",
            report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=seed, data_seed=seed,
        )
        self.trainer = Trainer(model=self.model, args=args, train_dataset=Windows(), callbacks=[Timing()])
        self.trainer.remove_callback(PrinterCallback)
        # The windows are already in pilelm's order: read them in order.
        self.trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(windows)))
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        finally:
            self.gate.finish()

    def run(self, n: int) -> None:
        self.gate.allow(n)

    @torch.no_grad()
    def val_loss(self, val: torch.Tensor) -> float:
        self.model.eval()
        total = 0.0
        for s in range(0, len(val), BATCH):
            x = val[s : s + BATCH]
            logits = self.model(input_ids=x[:, :-1]).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        return total / val[:, 1:].numel()

    def close(self) -> None:
        self.gate.allow(10**9)  # let the trainer thread run out its remaining steps, untimed


def pilelm_config(shards: Path, steps: int, seed: int, out: Path, precision: str, compile_model: bool) -> TrainConfig:
    return load_config(TrainConfig, overrides={
        "data": str(shards), "output": str(out),
        "model": {"arch": "gpt2", "vocab_size": VOCAB, "dropout": 0.0, **SHAPE},
        "optim": HYPER,
        "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.0},
        "loop": {"max_steps": steps, "micro_batch": BATCH, "seed": seed, "precision": precision,
                 "compile": compile_model, "tensorboard": False},
    })


class PilelmContender:
    def __init__(self, cfg: TrainConfig):
        self.trainer = Trainer(cfg)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def run(self, n: int) -> None:
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            result = self.trainer.train_step()
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)
            self.losses.append(result.loss)

    @torch.no_grad()
    def val_loss(self, val: torch.Tensor) -> float:
        model = self.trainer.raw_model
        model.eval()
        total = 0.0
        for s in range(0, len(val), BATCH):
            x = val[s : s + BATCH]
            with self.trainer.precision.autocast():
                _, loss = model(x[:, :-1], x[:, 1:])
            total += float(loss) * x[:, 1:].numel()
        return total / val[:, 1:].numel()

    def close(self) -> None:
        pass


def worker(kind: str, spec: dict, threads: int, conn) -> None:
    """One contender per process, so each runs as its users run it (allocator, threads)."""
    if threads:
        torch.set_num_threads(threads)
    if kind == "pilelm":
        contender = PilelmContender(spec["cfg"])
    else:
        contender = HFContender(spec["windows"], spec["steps"], kind == "hf-bf16", spec["seed"], spec["out"])
    conn.send(("ready", contender.trainer.precision.name if kind == "pilelm" else kind))
    while True:
        cmd, arg = conn.recv()
        if cmd == "run":
            contender.run(arg)
            conn.send((contender.times[:], contender.cpu_times[:], contender.losses[:]))
        elif cmd == "val":
            conn.send(contender.val_loss(arg))
        else:
            contender.close()
            conn.send("bye")
            return


class Remote:
    def __init__(self, name: str, spec: dict, threads: int):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(name, spec, threads, child), daemon=True)
        self.proc.start()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def ready(self) -> str:
        tag, info = self.conn.recv()
        return info

    def run(self, n: int) -> None:
        self.conn.send(("run", n))
        self.times, self.cpu_times, self.losses = self.conn.recv()

    def val_loss(self, val: torch.Tensor) -> float:
        self.conn.send(("val", val))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.conn.recv()
        self.proc.join(timeout=600)


def windows_of(cfg: TrainConfig, n_steps: int) -> torch.Tensor:
    """The (T + 1)-token windows pilelm reads in its first n_steps, in order."""
    from pilelm.tokens.shards import open_split
    from pilelm.training.loader import BatchLoader

    tokens = open_split(cfg.data, "train").dataset.tokens
    loader = BatchLoader(tokens, SHAPE["block_size"], BATCH, 1, seed=cfg.loop.seed)
    rows = []
    for g in range(n_steps * loader.global_batch):
        b = loader.batch(g, 1)
        rows.append(torch.cat([b["input_ids"][0], b["labels"][0, -1:]]))
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per contender")
    ap.add_argument("--segment", type=int, default=10, help="steps per turn before the next contender runs")
    ap.add_argument("--warmup", type=int, default=4, help="untimed first steps of each contender")
    ap.add_argument("--loss-steps", type=int, default=10, help="compare the mean training loss of the last N steps")
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--precision", default="auto", help="pilelm loop.precision")
    ap.add_argument("--compile", action="store_true", help="pilelm loop.compile=true")
    ap.add_argument("--skip-fp32", action="store_true", help="leave out HF fp32 (slower than its bf16 here)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench" / "train_throughput")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (MINIPILE / "val.jsonl.zst").is_file():
        raise SystemExit(f"{MINIPILE} is missing: this benchmark trains on minipile")

    shards = build_shards(args.work_dir)
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    cfg = pilelm_config(shards, args.steps, args.seed, tmp / "pilelm", args.precision, args.compile)
    windows = windows_of(cfg, args.steps)
    from pilelm.tokens.shards import open_split

    val_tokens = np.asarray(open_split(shards, "val").dataset.tokens)
    T = SHAPE["block_size"]
    n_val = min(args.val_windows, (len(val_tokens) - 1) // T)
    val = torch.from_numpy(np.stack([val_tokens[i * T : i * T + T + 1] for i in range(n_val)]).astype(np.int64))

    hf_spec = {"windows": windows, "steps": args.steps, "seed": args.seed}
    names = (["hf-fp32"] if not args.skip_fp32 else []) + ["hf-bf16", "pilelm"]
    contenders = [Remote(n, {"cfg": cfg} if n == "pilelm" else {**hf_spec, "out": tmp / n}, args.threads)
                  for n in names]
    info = {c.name: c.ready() for c in contenders}
    print(f"threads {args.threads or torch.get_num_threads()}, {args.steps} steps x {BATCH * T} tokens per "
          f"contender, segments of {args.segment}, pilelm precision {info['pilelm']}"
          f"{', compiled' if args.compile else ''}; one process per contender", flush=True)

    peaks = []
    done = 0
    while done < args.steps:
        n = min(args.segment, args.steps - done)
        for c in contenders:
            c.run(n)
        peaks.append(matmul_flops(torch.device("cpu"), seconds=0.2))
        done += n
        print(f"  {done}/{args.steps} steps: " + ", ".join(
            f"{c.name} {BATCH * T * len(c.times[args.warmup:]) / max(sum(c.times[args.warmup:]), 1e-9):,.0f} tok/s"
            for c in contenders), flush=True)

    tokens_per_step = BATCH * T
    rows = []
    for c in contenders:
        timed, cpu = c.times[args.warmup :], c.cpu_times[args.warmup :]
        tps = tokens_per_step * len(timed) / sum(timed)
        per_cpu_s = tokens_per_step * len(cpu) / sum(cpu)
        train_loss = statistics.mean(c.losses[-args.loss_steps :])
        rows.append((c.name, tps, per_cpu_s, train_loss, c.val_loss(val)))
    hf_best = max((r for r in rows if r[0].startswith("hf")), key=lambda r: r[1])
    peak = statistics.median(peaks)
    flops_per_token = GPT(GPTConfig(vocab_size=VOCAB, **SHAPE)).flops_per_token()  # 6N + 12LTC

    print()
    print(f"| contender | tokens/s | vs {hf_best[0]} | tokens per CPU-second | vs {hf_best[0]} | "
          f"train loss (last {args.loss_steps} steps) | val loss | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tps, per_cpu_s, train_loss, vloss in rows:
        mfu = tps * flops_per_token / peak
        print(f"| {name} | {tps:,.0f} | {tps / hf_best[1]:.2f}x | {per_cpu_s:,.0f} | {per_cpu_s / hf_best[2]:.2f}x | "
              f"{train_loss:.3f} | {vloss:.3f} | {100 * mfu:.1f}% |")
    print()
    print(f"tokens per contender: {args.steps * tokens_per_step:,}; measured bf16 matmul rate "
          f"{peak / 1e9:,.0f} GFLOP/s (median of {len(peaks)}, all threads); {flops_per_token / 1e6:.1f} MFLOP "
          f"per token (6N + 12LTC); HF loss is over 255 targets per 256-token window, pilelm's over 256")
    ratio = rows[-1][1] / hf_best[1]
    print(f"pilelm / {hf_best[0]}: {ratio:.2f}x tokens/s, {rows[-1][2] / hf_best[2]:.2f}x tokens per CPU-second; "
          f"val loss {rows[-1][4]:.3f} vs {hf_best[4]:.3f}")
    for c in contenders:
        c.close()
    if not math.isfinite(ratio):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
