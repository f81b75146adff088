"""``pilelm train``: causal LM (GPT-2 / GPT-NeoX) or masked LM (BERT) training on token shards.

One optimizer step = ``accum`` micro-batches per rank (``accum`` from ``loop.tokens_per_step``),
gradients reduced across ranks (DDP or FSDP2), clipped, checked for non-finite values, then
the step. The loss of a step is the exact mean over every target token of the global batch:
each micro-batch's loss is normalised by the global count, so 1 process x 4 micro-batches and
2 processes x 2 micro-batches compute the same numbers.

Output (the run-dir contract, see ``pilelm/training/checkpoint.py``): ``RUN/config.yaml`` (resolved),
``RUN/tokenizer/`` (copied from the shards), ``RUN/metrics.jsonl`` (one JSON per logged step),
``RUN/tensorboard/``, ``RUN/checkpoints/step_XXXXXXXX/`` and ``RUN/manifest.json`` (stage
"train", written last). Rerunning the same command resumes from the newest intact checkpoint
and reproduces the uninterrupted run's losses exactly (same device and world size).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.core.config import dump_yaml, from_dict, to_dict
from pilelm.core.manifest import require_stage, write_manifest
from pilelm.models import build_model, model_spec
from pilelm.models.bert import BertConfig
from pilelm.models.gpt import GPTConfig
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    close_distributed,
    init_distributed,
    unwrap,
    wrap_model,
)
from pilelm.training.loader import IGNORE_INDEX, BatchLoader, ByteCounter, SpecialTokens, eval_batches
from pilelm.training.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_multiplier, set_lr
from pilelm.training.precision import matmul_flops, resolve_precision

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient (loop.on_nonfinite=stop)."""


@dataclass
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (the schedule spans them)."""
    micro_batch: int = 16
    """Sequences per forward/backward pass on each rank."""
    tokens_per_step: int = 0
    """Target tokens per optimizer step over all ranks; gradients are accumulated over
    ceil(tokens_per_step / (micro_batch * block_size * world)) micro-batches. 0 = one micro-batch."""
    eval_every: int = 250
    """Validation loss and bits-per-byte every this many steps (and at the end); 0 = never."""
    eval_windows: int = 64
    """Validation windows (of block_size tokens) per evaluation; 0 = the whole val split."""
    save_every: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Keep the newest k checkpoints; 0 keeps all."""
    log_every: int = 10
    """Write metrics.jsonl / TensorBoard every this many steps."""
    seed: int = 1337
    """Seed of the initialisation, the data order, the masks and dropout."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16"] = "auto"
    """fp32; bf16-autocast (fp32 weights, bf16 matmuls); bf16 (bf16 weights and activations, fp32
    master weights and optimizer state: half the activation memory); auto = bf16-autocast where
    bf16 is native (CUDA, CPUs with AVX512-BF16/AMX), else fp32."""
    compile: bool = False
    """torch.compile the model (minutes of compilation; pays off on long runs)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30 % more compute)."""
    fused_loss: bool = True
    """Chunked output projection + cross-entropy that never materialises the (B, T, V) logits (GPT)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: stop with an error, or skip that step's update."""
    max_skips: int = 20
    """With on_nonfinite=skip: stop after this many skipped steps in a row."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DDP (replicated weights) or FSDP2 (sharded weights, gradients, optimizer state)."""
    num_threads: int = 0
    """CPU intra-op threads; 0 keeps torch's default (the core count)."""
    stop_at_step: int = 0
    """Checkpoint and stop after this step as a preempted job would (rerun to resume); 0 = off."""
    peak_flops: float = 0.0
    """Peak FLOP/s per device for MFU; 0 measures the bf16 matmul rate once (cached in the run dir)."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN/tensorboard."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"loop.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("tokens_per_step", "eval_every", "eval_windows", "keep_last", "num_threads", "stop_at_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"loop.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("save_every", "log_every", "max_skips"):
            if getattr(self, key) < 1:
                raise ValueError(f"loop.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    data: Path = Path("")
    """Token shard directory (output of `pilelm tokenize`): trains on train.bin, validates on val.bin."""
    output: Path = Path("runs/train")
    """Run directory: checkpoints, metrics, TensorBoard logs, manifest."""
    family: Literal["gpt", "bert"] = "gpt"
    """gpt: causal LM configured by the model section; bert: masked LM configured by the bert section."""
    model: GPTConfig = field(default_factory=GPTConfig)
    """GPT-2 / GPT-NeoX shape (family=gpt)."""
    bert: BertConfig = field(default_factory=BertConfig)
    """Encoder shape (family=bert); bert.nsp=true adds next-sentence prediction."""
    mask_prob: float = 0.15
    """bert: fraction of tokens chosen for prediction (80 % [MASK], 10 % random, 10 % kept)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Batching, precision, logging, evaluation and checkpoint cadence."""
    resume: bool = True
    """Resume from the newest intact checkpoint in the output directory if there is one."""
    init_from: str = ""
    """Start from the weights of a run directory (its newest intact checkpoint) or of one checkpoint folder, e.g. what `pilelm import` wrote, instead of random ones. The model section comes from there (dropout from this config); optimizer, schedule and data order start fresh. A run that has checkpoints of its own resumes from them instead."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")

    @property
    def model_config(self) -> GPTConfig | BertConfig:
        return self.model if self.family == "gpt" else self.bert

    @property
    def objective(self) -> Literal["clm", "mlm", "mlm+nsp"]:
        if self.family == "gpt":
            return "clm"
        return "mlm+nsp" if self.bert.nsp else "mlm"


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def round_vocab(n: int, multiple: int = 64) -> int:
    """Vocabulary padded up to a multiple of 64: matmul-friendly shapes (nanoGPT: 50257 -> 50304)."""
    return (n + multiple - 1) // multiple * multiple


def _special_tokens(tokenizer_dir: Path) -> SpecialTokens:
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if tok.mask_id is None:
        raise ValueError(f"family=bert needs a tokenizer with a mask token; {tokenizer_dir} has none "
                         "(train a WordPiece tokenizer: pilelm tokenizer train ... --kind wordpiece)")
    return SpecialTokens(mask=tok.mask_id, vocab_size=tok.vocab_size, cls=tok.cls_id, sep=tok.sep_id,
                         pad=tok.pad_id if tok.pad_id is not None else 0, eod=tok.eod_id)


def _init_source(cfg: TrainConfig, tokenizer_dir: Path) -> tuple[Path, TrainConfig]:
    """``cfg.init_from`` -> (the checkpoint folder to start from, cfg with that model's section).

    Refuses a tokenizer other than the one the data was tokenized with: the ids would mean
    other tokens to the model.
    """
    from pilelm.models import config_from_spec
    from pilelm.tokens.identity import require_same_tokenizer

    src = Path(cfg.init_from)
    if (src / "model.json").is_file():
        step_dir, run_dir = src, src.parent.parent
        problem = ckpt_io.verify_checkpoint(step_dir)
        if problem:
            raise ValueError(f"init_from: {step_dir} is not an intact checkpoint ({problem})")
    else:
        found = ckpt_io.find_resumable(src, train_state=False) if src.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"init_from: {src} holds no intact checkpoint (RUN/checkpoints/step_*/); "
                                    "give a run directory such as `pilelm import`'s output, or a checkpoint folder")
        step_dir, run_dir = found[1], src
    mcfg = config_from_spec(json.loads((step_dir / "model.json").read_text()))
    family = "gpt" if isinstance(mcfg, GPTConfig) else "bert"
    mcfg = replace(mcfg, dropout=(cfg.model if family == "gpt" else cfg.bert).dropout)
    if (run_dir / "tokenizer").is_dir():
        require_same_tokenizer(run_dir, tokenizer_dir, what="init_from")
    else:
        log.warning("init_from: %s has no tokenizer/ folder; cannot check it matches the data's", run_dir)
    return step_dir, replace(cfg, family=family, **{"model" if family == "gpt" else "bert": mcfg})


class Trainer:
    """Everything one training run needs, built from a ``TrainConfig``; ``fit()`` runs the loop.

    Benchmarks drive ``train_step()`` directly.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
        from pilelm.tokens.shards import open_split

        self.info = info or DistInfo()
        loop = cfg.loop
        if not str(cfg.data) or str(cfg.data) == ".":
            raise ValueError("data: give the token shard directory (--data SHARD_DIR)")
        require_stage(cfg.data, "tokenize", what="data")
        if loop.num_threads:
            torch.set_num_threads(loop.num_threads)
        self.device = self.info.device
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        else:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
            torch.backends.cudnn.allow_tf32 = True
        self.out = Path(cfg.output)
        self.train_split = open_split(cfg.data, "train")
        self.val_split = open_split(cfg.data, "val") if (Path(cfg.data) / "val.idx").is_file() else None

        init_step = None
        if cfg.init_from:
            init_step, cfg = _init_source(cfg, self.train_split.tokenizer_dir)

        # Resolve the vocabulary from the shards (model.vocab_size=0).
        mcfg = cfg.model_config
        if mcfg.vocab_size == 0:
            mcfg = replace(mcfg, vocab_size=round_vocab(int(self.train_split.vocab_size)))
        elif mcfg.vocab_size < self.train_split.vocab_size:
            key = "model" if cfg.family == "gpt" else "bert"
            raise ValueError(f"{key}.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                             f"{self.train_split.vocab_size}; set {key}.vocab_size=0 to take it from the shards")
        cfg = replace(cfg, **({"model": mcfg} if cfg.family == "gpt" else {"bert": mcfg}))
        self.cfg = cfg
        self.mcfg = mcfg
        self.seq_len = mcfg.block_size
        self.precision = resolve_precision(loop.precision, self.device,
                                           loop.distributed if self.info.enabled else None)

        # Batch geometry.
        per_micro = loop.micro_batch * self.seq_len * self.info.world
        self.accum = max(1, math.ceil(loop.tokens_per_step / per_micro)) if loop.tokens_per_step else 1
        if loop.tokens_per_step and self.accum * per_micro != loop.tokens_per_step:
            log.info("loop.tokens_per_step=%d is not a multiple of micro_batch*block_size*world=%d; "
                     "using %d tokens per step", loop.tokens_per_step, per_micro, self.accum * per_micro)
        special = (_special_tokens(self.train_split.tokenizer_dir)
                   if cfg.family == "bert" else None)
        self.special = special
        self.loader = BatchLoader(
            self.train_split.dataset.tokens, self.seq_len, loop.micro_batch, self.accum,
            rank=self.info.rank, world=self.info.world, seed=loop.seed, objective=cfg.objective,
            special=special, mask_prob=cfg.mask_prob,
        )

        # Model, optimizer; all ranks draw the same initial weights from the seed.
        torch.manual_seed(loop.seed)
        model = build_model(mcfg)
        if init_step is not None:
            source, _ = ckpt_io.load_model(init_step)
            model.load_state_dict(source.state_dict())
            del source
            log.info("initialised from %s", init_step)
        self.flops_per_token = float(model.flops_per_token(self.seq_len))
        self.num_params = sum(p.numel() for p in model.parameters())
        model.to(self.device)
        self.precision.prepare_model(model)
        if loop.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = wrap_model(model, self.info, loop.distributed, mixed_bf16=self.precision.name == "bf16")
        self.raw_model = unwrap(self.model)
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.raw_model, cfg.optim), self.raw_model)
        self.forward = torch.compile(self.model) if loop.compile else self.model
        torch.manual_seed(loop.seed + 1 + self.info.rank)  # dropout streams differ per rank
        self.step = 0
        self.tokens_seen = 0
        self.skips_in_a_row = 0

    # --- the step --------------------------------------------------------------------------

    def _model_kwargs(self, batch: dict[str, torch.Tensor], counts: tuple[float, float]) -> dict[str, Any]:
        if self.cfg.family == "gpt":
            return {"return_logits": False} if self.cfg.loop.fused_loss else {}
        kw: dict[str, Any] = {"num_targets": counts[0], "num_pairs": counts[1]}
        for key in ("token_type_ids", "attention_mask", "next_sentence_label"):
            if key in batch:
                kw[key] = batch[key]
        return kw

    def train_step(self) -> StepResult:
        cfg, loop = self.cfg, self.cfg.loop
        self.model.train()
        mult = lr_multiplier(self.step, loop.max_steps, cfg.schedule)
        set_lr(self.optimizer, mult)
        micro = self.loader.next_step()
        world = self.info.world
        counts = (0.0, 0.0)
        if cfg.family == "bert":
            # The masked-position count of the whole global batch (masks are random).
            local = torch.tensor([float(sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)),
                                  float(sum(len(m["input_ids"]) for m in micro))], dtype=torch.float64)
            total = all_reduce_sum(local.to(self.device), self.info).cpu()
            counts = (max(1.0, float(total[0])), float(total[1]))
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._no_sync(last=i == len(micro) - 1), self.precision.autocast():
                _, loss = self.forward(batch["input_ids"], batch["labels"], **self._model_kwargs(batch, counts))
            # Each rank's share of the global mean; DDP/FSDP average gradients over ranks,
            # so the backward pass takes the share times the world size.
            share = loss / (len(micro) * world) if cfg.family == "gpt" else loss
            (share * world).backward()
            loss_sum += share.detach().float()
        grad_norm = self._clip()
        all_reduce_sum(loss_sum, self.info)
        loss_value, norm_value = float(loss_sum), float(grad_norm)  # one host sync per step
        skipped = False
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.skips_in_a_row += 1
            if loop.on_nonfinite == "stop" or self.skips_in_a_row > loop.max_skips:
                raise NonFiniteLossError(
                    f"step {self.step + 1}: loss {loss_value}, gradient norm {norm_value}; lower optim.lr, "
                    f"raise schedule.warmup_steps or use loop.precision=fp32 (last checkpoint: "
                    f"{ckpt_io.latest_checkpoint(self.out)})")
            log.warning("step %d: non-finite loss/gradient (%s, %s); update skipped",
                        self.step + 1, loss_value, norm_value)
            skipped = True
        else:
            self.skips_in_a_row = 0
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.loader.tokens_per_step
        return StepResult(self.step, loss_value, norm_value, cfg.optim.lr * mult, skipped)

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not self.info.enabled or last:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        # The optimizer's parameters: with fp32 master weights the gradients live on those.
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return norm

    # --- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per target token) and, for causal LMs, bits per byte."""
        if self.val_split is None:
            return {}
        loop = self.cfg.loop
        model = self.model
        model.eval()
        nll = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll sum, targets, bytes
        val_tokens = self.val_split.dataset.tokens
        if self.cfg.family == "gpt":
            counter = ByteCounter(np.asarray(self.val_split.dataset.sizes), np.asarray(self.val_split.nbytes))
            for x, y, nbytes in eval_batches(val_tokens, self.seq_len, loop.micro_batch, loop.eval_windows,
                                             self.info.rank, self.info.world, counter):
                with self.precision.autocast():
                    _, loss = model(x.to(self.device), y.to(self.device), return_logits=False)
                nll += torch.tensor([float(loss) * y.numel(), y.numel(), nbytes], dtype=torch.float64,
                                    device=self.device)
        else:
            val = BatchLoader(val_tokens, self.seq_len, loop.micro_batch, 1, seed=loop.seed,
                              objective=self.cfg.objective, special=self.special, mask_prob=self.cfg.mask_prob)
            n = min(val.sampler.num_windows, loop.eval_windows or val.sampler.num_windows)
            for b, g in enumerate(range(0, n, loop.micro_batch)):
                if b % self.info.world != self.info.rank:
                    continue
                batch = {k: v.to(self.device) for k, v in val.batch(g, min(loop.micro_batch, n - g)).items()}
                count = float((batch["labels"] != IGNORE_INDEX).sum())
                kw = {k: batch[k] for k in ("token_type_ids", "attention_mask") if k in batch}
                with self.precision.autocast():
                    _, loss = model(batch["input_ids"], batch["labels"], num_targets=1.0, **kw)
                nll += torch.tensor([float(loss), count, 0.0], dtype=torch.float64, device=self.device)
        all_reduce_sum(nll, self.info)
        total, targets, nbytes = (float(v) for v in nll)
        out = {"val_loss": total / max(targets, 1.0)}
        if nbytes > 0:
            out["val_bpb"] = total / math.log(2) / nbytes
        return out

    # --- checkpoints -----------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint of the current step (all ranks take part; rank 0 writes)."""
        step_dir = self.out / ckpt_io.CHECKPOINTS / ckpt_io.step_dir_name(self.step)
        model_state, optim_state = self._full_state()
        if self.info.is_main:
            if step_dir.exists():  # a half-written attempt at this step
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
        barrier(self.info)
        if self.info.is_main:
            ckpt_io.save_weights(step_dir, model_state, self.mcfg)
            ckpt_io.save_torch(step_dir / ckpt_io.TRAIN_STATE, {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "optimizer": optim_state,
                "loader": self.loader.state_dict(),
                "world": self.info.world,
            })
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ckpt_io.save_torch(step_dir / ckpt_io.rng_file(self.info.rank), rng)
        barrier(self.info)
        if self.info.is_main:
            ckpt_io.finalize_checkpoint(step_dir)
            ckpt_io.prune_checkpoints(self.out, self.cfg.loop.keep_last)
        barrier(self.info)
        return step_dir

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Unsharded model and optimizer state (FSDP2 gathers to CPU; collective)."""
        if self.cfg.loop.distributed == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.raw_model, options=opts),
                    get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts))
        return self.precision.model_state(self.raw_model), self.optimizer.state_dict()

    def load(self, step_dir: Path) -> None:
        """Restore weights, optimizer, loader position and RNG from a checkpoint."""
        from safetensors.torch import load_file

        saved_spec = json.loads((step_dir / "model.json").read_text())
        if saved_spec != json.loads(json.dumps(model_spec(self.mcfg))):
            raise ValueError(
                f"{step_dir} holds a different model ({saved_spec['config']}) than this config "
                f"({to_dict(self.mcfg)}); train into a new --output, or rerun with the run's config.yaml")
        state = ckpt_io.load_torch(step_dir / ckpt_io.TRAIN_STATE)
        if state.get("world", 1) != self.info.world:
            log.warning("%s was saved by %d processes, resuming with %d: the data order continues, "
                        "but losses will not match the uninterrupted run exactly", step_dir,
                        state.get("world"), self.info.world)
        weights = load_file(str(step_dir / "model.safetensors"), device="cpu")
        if self.cfg.loop.distributed == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw_model, weights, options=opts)
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.precision.load_model_state(self.raw_model, weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict({**state["loader"], "global_batch": self.loader.global_batch}
                                    if state.get("world", 1) != self.info.world else state["loader"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        rng_path = step_dir / ckpt_io.rng_file(self.info.rank)
        if rng_path.is_file():
            rng = ckpt_io.load_torch(rng_path)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> Path:
        cfg, loop, info = self.cfg, self.cfg.loop, self.info
        out = self.out
        found = ckpt_io.find_resumable(out) if out.exists() else None
        if found and not cfg.resume:
            raise ValueError(f"output {out} already holds checkpoints; give a new --output or resume=true")
        if found:
            self.load(found[1])
            if self.step >= loop.max_steps and (out / "manifest.json").is_file():
                log.info("%s already finished %d steps; nothing to do (raise loop.max_steps to train on)",
                         out, self.step)
                return out
            log.info("resumed from %s (step %d)", found[1], self.step)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.train_split.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        peak = loop.peak_flops or self._peak_flops()
        metrics = MetricsLog(out, self.step, enabled=info.is_main, tensorboard=loop.tensorboard)
        end = min(loop.max_steps, loop.stop_at_step) if loop.stop_at_step else loop.max_steps
        bar = tqdm(total=loop.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=True if not info.is_main else None)
        t_start = time.perf_counter()
        train_time = 0.0
        tokens_at_start = self.tokens_seen
        log.info("training %s (%.1fM parameters) for %d steps: %d sequences x %d tokens x %d micro-batches "
                 "x %d ranks = %d tokens per step, precision %s", cfg.family, self.num_params / 1e6,
                 loop.max_steps, loop.micro_batch, self.seq_len, self.accum, info.world,
                 self.loader.tokens_per_step, self.precision.name)
        last: StepResult | None = None
        evals: dict[str, float] = {}
        window_t, window_tokens = time.perf_counter(), 0
        try:
            while self.step < end:
                t0 = time.perf_counter()
                last = self.train_step()
                train_time += time.perf_counter() - t0
                window_tokens += self.loader.tokens_per_step
                row: dict[str, Any] = {}
                if self.step % loop.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    mfu = tps * self.flops_per_token / (peak * info.world) if peak else 0.0
                    row = {"step": self.step, "loss": round(last.loss, 6), "lr": last.lr,
                           "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
                           "grad_norm": round(last.grad_norm, 4), "epoch": round(self.loader.epoch(), 4)}
                    if last.skipped:
                        row["skipped"] = True
                    bar.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}", tok_s=f"{tps:,.0f}",
                                    mfu=f"{100 * mfu:.1f}%", refresh=False)
                if loop.eval_every and (self.step % loop.eval_every == 0 or self.step == loop.max_steps):
                    evals = self.evaluate()
                    row = {**(row or {"step": self.step, "loss": round(last.loss, 6), "lr": last.lr,
                                      "tokens": self.tokens_seen}), **evals}
                    window_t = time.perf_counter()  # keep eval time out of tokens/s
                if row:
                    metrics.write(row)
                if self.step % loop.save_every == 0 or self.step == end:
                    self.save()
                    window_t = time.perf_counter()
                bar.update(1)
        finally:
            bar.close()
            metrics.close()
        if self.step < loop.max_steps:
            log.info("stopped at step %d (loop.stop_at_step); rerun the same command to resume", self.step)
            return out
        if info.is_main:
            tokens = self.tokens_seen - tokens_at_start
            counts = {"steps": self.step, "tokens": self.tokens_seen, "parameters": self.num_params,
                      "final_loss": last.loss if last else None, **evals}
            write_manifest(out, "train", cfg, inputs=[cfg.data], counts=counts,
                           timings={"total": time.perf_counter() - t_start, "train": train_time},
                           extra={"tokens_per_s": tokens / train_time if train_time else None,
                                  "precision": self.precision.name, "world": info.world,
                                  "peak_flops": peak})
        barrier(info)
        return out

    def _peak_flops(self) -> float:
        """The device's bf16 matmul rate, measured once per run dir (rank 0 measures)."""
        path = self.out / "hardware.json"
        key = f"{self.device.type}:{torch.get_num_threads()}"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if key not in cached:
            rate = matmul_flops(self.device) if self.info.is_main else 0.0
            if self.info.is_main:
                atomic_write_json(path, {**cached, key: rate})
            return rate
        return float(cached[key])


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning freed blocks to the OS between training steps.

    glibc serves allocations above its mmap threshold with fresh ``mmap`` calls and unmaps
    them on free, so every step's large activations page-fault in again (expensive in a VM).
    Raising the mmap and trim thresholds keeps the freed memory in the heap for reuse, as
    jemalloc/tcmalloc do (PyTorch's CPU performance guide recommends those for this reason).
    Measured here on the CPU benchmark shape: 9 % faster steps. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in the backward pass; parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


class MetricsLog:
    """RUN/metrics.jsonl (append; a resumed run first drops rows after its step) + TensorBoard."""

    def __init__(self, out: Path, step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key[4:]}",
                                       value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def run_train(cfg: TrainConfig) -> Path:
    """Train (or resume) into ``cfg.output``; returns the run directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    info = init_distributed(cfg.loop.device)
    try:
        return Trainer(cfg, info).fit()
    finally:
        if launched:
            close_distributed()


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved TrainConfig a run was trained with (RUN/config.yaml)."""
    import yaml

    return from_dict(TrainConfig, yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
