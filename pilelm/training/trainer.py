"""``pilelm train``: causal LM (GPT-2 / GPT-NeoX) or masked LM (BERT) training on token shards.

The loop knows no model family: it asks the family's ``ModelSpec`` (``pilelm/models/spec.py``)
for the objective the loader collates, the loss normalisation, the model arguments of a step
and the validation step. The config lives in ``training/config.py``.

One optimizer step = ``accum`` micro-batches per rank (``accum`` from ``loop.tokens_per_step``),
gradients reduced across ranks (DDP or FSDP2), clipped, checked for non-finite values, then
the step. The run ends at the first budget reached (steps, tokens or minutes:
``training/budget.py``, which also gives each step's learning-rate factor). The loss of a
step is the exact mean over every target token of the global batch
(``ModelSpec.loss_normalisation``), so 1 process x 4 micro-batches and 2 processes x 2
micro-batches compute the same numbers.

Output (the run-dir contract, see ``pilelm/training/checkpoint.py``): ``RUN/config.yaml`` (resolved),
``RUN/tokenizer/`` (copied from the shards), ``RUN/metrics.jsonl`` (one JSON per logged step),
``RUN/tensorboard/``, ``RUN/checkpoints/step_XXXXXXXX/`` and ``RUN/manifest.json`` (stage
"train", written last). Rerunning the same command resumes from the newest intact checkpoint
and reproduces the uninterrupted run's losses exactly (same device and world size).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pilelm.core.atomic import atomic_write_text
from pilelm.core.config import dump_yaml, to_dict
from pilelm.core.manifest import MANIFEST, clear_manifest, require_stage
from pilelm.core.stages import load_hook
from pilelm.models import build_model, config_from_spec, model_spec
from pilelm.models.spec import IGNORE_INDEX
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.budget import TrainingBudget
from pilelm.training.config import LoopConfig, TrainConfig, load_run_config, round_vocab
from pilelm.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    close_distributed,
    init_distributed,
    no_sync,
    unwrap,
    wrap_model,
)
from pilelm.training.ema import WeightEMA, trained_tensors
from pilelm.training.init_from import init_source
from pilelm.training.loader import (
    BatchLoader,
    ByteCounter,
    document_window_starts,
    special_tokens_of,
    validation_batches,
)
from pilelm.training.memory import enable_activation_checkpointing, keep_freed_memory_mapped
from pilelm.training.metrics_log import MetricsLog
from pilelm.training.mfu import resolve_peak
from pilelm.training.optim import build_optimizer, set_lr
from pilelm.training.outcomes import ManifestEntry, NonFiniteLossError, StepResult
from pilelm.training.precision import resolve_precision
from pilelm.training.resume import discard_run, record_run_inputs, require_same_run
from pilelm.training.run_log import RunLog

# The stage table (pilelm/core/stages.py) and callers find the config here too.
__all__ = ["LoopConfig", "ManifestEntry", "NonFiniteLossError", "StepResult", "TrainConfig", "Trainer", "load_run_config",
           "round_vocab", "run_train"]

log = logging.getLogger(__name__)


class Trainer:
    """Everything one training run needs, built from a ``TrainConfig``; ``fit()`` runs the loop.

    Benchmarks drive ``train_step()`` directly.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
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
        init_step = self._open_data(cfg)
        self.precision = resolve_precision(loop.precision, self.device,
                                           loop.distributed if self.info.enabled else None)
        self._build_loader()
        self._build_model(init_step)
        torch.manual_seed(loop.seed + 1 + self.info.rank)  # dropout streams differ per rank
        self.step = 0
        self.tokens_seen = 0
        self.skips_in_a_row = 0
        self.elapsed = 0.0  # seconds of training loop, carried over resumes (training/budget.py)
        self.clock = time.perf_counter  # tests inject a fake one

    def _open_data(self, cfg: TrainConfig) -> Path | None:
        """Open the shards and resolve the config against them (``init_from``, the vocabulary
        from the shards when model.vocab_size=0); sets ``cfg``, ``mcfg``, ``spec``, ``seq_len``.
        Returns the checkpoint to initialise from, if any."""
        from pilelm.tokens.shards import listed_splits, open_split

        self.train_split = open_split(cfg.data, "train")
        self.val_split = open_split(cfg.data, "val") if "val" in listed_splits(cfg.data) else None

        init_step = None
        if cfg.init_from:
            init_step, cfg = init_source(cfg, self.train_split.tokenizer_dir)
        self.spec = spec = cfg.spec

        # Resolve the vocabulary from the shards (model.vocab_size=0).
        mcfg = cfg.model_config
        if mcfg.vocab_size == 0:
            mcfg = replace(mcfg, vocab_size=round_vocab(int(self.train_split.vocab_size)))
        elif mcfg.vocab_size < self.train_split.vocab_size:
            key = spec.config_section
            raise ValueError(f"{key}.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                             f"{self.train_split.vocab_size}; set {key}.vocab_size=0 to take it from the shards")
        cfg = replace(cfg, **{spec.config_section: mcfg})
        self.cfg = cfg
        self.mcfg = mcfg
        self.seq_len = mcfg.block_size
        return init_step

    def _build_loader(self) -> None:
        """Batch geometry (micro-batches per step from loop.tokens_per_step), the loader, the budget."""
        cfg, loop, spec = self.cfg, self.cfg.loop, self.spec
        per_micro = loop.micro_batch * self.seq_len * self.info.world
        self.accum = max(1, math.ceil(loop.tokens_per_step / per_micro)) if loop.tokens_per_step else 1
        if loop.tokens_per_step and self.accum * per_micro != loop.tokens_per_step:
            log.info("loop.tokens_per_step=%d is not a multiple of micro_batch*block_size*world=%d; "
                     "using %d tokens per step", loop.tokens_per_step, per_micro, self.accum * per_micro)
        special = special_tokens_of(self.train_split.tokenizer_dir, spec.family) if spec.needs_special_tokens else None
        self.special = special
        starts = None
        if loop.window_start == "document":
            if cfg.objective != "clm":
                raise ValueError("loop.window_start=document is for causal LMs (family=gpt); use stride")
            starts = document_window_starts(np.asarray(self.train_split.dataset.sizes), self.seq_len)
        self.loader = BatchLoader(
            self.train_split.dataset.tokens, self.seq_len, loop.micro_batch, self.accum,
            rank=self.info.rank, world=self.info.world, seed=loop.seed, objective=cfg.objective,
            special=special, mask_prob=cfg.mask_prob, window_starts=starts,
        )
        self.budget = TrainingBudget(loop.max_steps, loop.max_tokens, loop.max_minutes, self.loader.tokens_per_step)

    def _build_model(self, init_step: Path | None) -> None:
        """Model, optimizer, compile, DP-SGD, EMA; all ranks draw the same initial weights from the seed."""
        cfg, loop = self.cfg, self.cfg.loop
        torch.manual_seed(loop.seed)
        model = build_model(self.mcfg)
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
        # DP-SGD (pilelm/privacy/dpsgd.py) replaces the gradient computation of a step.
        self.private = load_hook("train.privacy")(self) if cfg.privacy.enabled else None
        self.ema = None
        if loop.ema:
            if loop.distributed == "fsdp" and self.info.enabled:
                raise ValueError("loop.ema needs whole weights on every rank; use loop.distributed=ddp or loop.ema=0")
            self.ema = WeightEMA(trained_tensors(self.raw_model), loop.ema)

    # --- the step --------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        cfg, loop = self.cfg, self.cfg.loop
        self.model.train()
        mult = self.budget.lr_multiplier(self.step, self.elapsed, cfg.schedule)
        set_lr(self.optimizer, mult)
        if self.private is not None:
            loss_sum, grad_norm, tokens = self.private.gradients()
        else:
            loss_sum, grad_norm = self._gradients(self.loader.next_step())
            tokens = self.loader.tokens_per_step
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
            if self.ema is not None:
                self.ema.update(trained_tensors(self.raw_model))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        return StepResult(self.step, loss_value, norm_value, cfg.optim.lr * mult, skipped)

    def _gradients(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's micro-batches, reduce, clip: (loss, grad norm)."""
        loop = self.cfg.loop
        world = self.info.world
        counts = (0.0, 0.0)
        global_count = self.spec.loss_normalisation == "global_target_count"
        if global_count:
            # The target (and pair) count of the whole global batch (masks are random).
            local = torch.tensor([float(sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)),
                                  float(sum(len(m["input_ids"]) for m in micro))], dtype=torch.float64)
            total = all_reduce_sum(local.to(self.device), self.info).cpu()
            counts = (max(1.0, float(total[0])), float(total[1]))
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        cut = self.window_cut()
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if cut > 1:  # sequence-length warmup: the same tokens as more, shorter windows
                batch = {k: v.reshape(v.size(0) * cut, v.size(1) // cut) for k, v in batch.items()}
            with no_sync(self.model, self.info, last=i == len(micro) - 1), self.precision.autocast():
                loss = self.step_loss(batch, self.spec.train_kwargs(batch, counts, loop.fused_loss))
            # Each rank's share of the global mean; DDP/FSDP average gradients over ranks,
            # so the backward pass takes the share times the world size.
            share = loss if global_count else loss / (len(micro) * world)
            (share * world).backward()
            loss_sum += share.detach().float()
        grad_norm = self._clip()
        all_reduce_sum(loss_sum, self.info)
        return loss_sum, grad_norm

    def window_cut(self) -> int:
        """Into how many windows each training window is cut now (``loop.seq_len_warmup``)."""
        warmup = self.cfg.loop.seq_len_warmup
        if not warmup or self.cfg.objective != "clm":
            return 1
        done = self.budget.progress(self.step, self.elapsed) / warmup
        cut = 4 if done < 1 / 3 else 2 if done < 2 / 3 else 1
        while cut > 1 and self.seq_len % cut:
            cut //= 2
        return cut

    def step_loss(self, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch as the family's spec normalises it. A subclass may
        override it (``pilelm distill`` mixes in a teacher's soft targets); the loop around it
        (accumulation, clipping, checkpoints, resume) stays this one."""
        _, loss = self.forward(batch["input_ids"], batch["labels"], **kwargs)
        return loss

    def manifest_entry(self) -> ManifestEntry:
        """What the finished run's manifest records besides the loop's counts and timings."""
        return ManifestEntry("train", self.cfg, [str(self.cfg.data)])

    def _clip(self) -> torch.Tensor:
        # The optimizer's parameters: with fp32 master weights the gradients live on those.
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return norm

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per target token) and, where the batches count bytes (causal
        LMs), bits per byte; with ``loop.ema`` of the averaged weights."""
        if self.val_split is None:
            return {}
        if self.ema is None:
            return self._evaluate()
        with self.ema.applied(dict(self.raw_model.named_parameters())):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        loop = self.cfg.loop
        model = self.model
        model.eval()
        nll = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll sum, targets, bytes
        split = self.val_split
        counter = ByteCounter(np.asarray(split.dataset.sizes), np.asarray(split.nbytes))
        batches = validation_batches(
            split.dataset.tokens, self.seq_len, loop.micro_batch, loop.eval_windows, self.info.rank,
            self.info.world, objective=self.cfg.objective, counter=counter, seed=loop.seed,
            special=self.special, mask_prob=self.cfg.mask_prob)
        for batch, nbytes in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.precision.autocast():
                loss_sum, targets = self.spec.eval_loss(model, batch)
            nll += torch.tensor([loss_sum, targets, nbytes], dtype=torch.float64, device=self.device)
        all_reduce_sum(nll, self.info)
        total, targets, nbytes = (float(v) for v in nll)
        out = {"val_loss": total / max(targets, 1.0)}
        if nbytes > 0:
            out["val_bpb"] = total / math.log(2) / nbytes
        return out

    # --- checkpoints -----------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint of the current step (all ranks take part; rank 0 writes)."""
        step_dir = ckpt_io.checkpoint_dir(self.out, self.step)
        model_state, optim_state = self._full_state()
        if self.info.is_main:
            if step_dir.exists():  # a half-written attempt at this step
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
        barrier(self.info)
        if self.info.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": optim_state,
                     "loader": self.loader.state_dict(), "world": self.info.world, "elapsed_s": self.elapsed}
            if self.ema is not None:  # the average is the model; the raw weights resume training
                state["raw_model"], state["ema_updates"] = model_state, self.ema.updates
                model_state = {**model_state, **self.ema.state_dict_of(self.raw_model)}
            ckpt_io.save_weights(step_dir, model_state, self.mcfg)
            ckpt_io.save_torch(step_dir / ckpt_io.TRAIN_STATE, state)
            if self.private is not None:
                self.private.save(step_dir)
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
        # Through the config class: a model.json written before a key existed reads its default.
        if model_spec(config_from_spec(saved_spec)) != model_spec(self.mcfg):
            raise ValueError(
                f"{step_dir} holds a different model ({saved_spec['config']}) than this config "
                f"({to_dict(self.mcfg)}); train into a new --output, or rerun with the run's config.yaml")
        state = ckpt_io.load_torch(step_dir / ckpt_io.TRAIN_STATE)
        if state.get("world", 1) != self.info.world:
            log.warning("%s was saved by %d processes, resuming with %d: the data order continues, "
                        "but losses will not match the uninterrupted run exactly", step_dir,
                        state.get("world"), self.info.world)
        weights = load_file(str(step_dir / "model.safetensors"), device="cpu")
        if self.ema is not None and "raw_model" in state:
            self.ema.load_state_dict(weights, int(state["ema_updates"]))
            weights = state["raw_model"]
        elif self.ema is not None or "raw_model" in state:
            raise ValueError(f"{step_dir} was saved with{'out' if self.ema is not None else ''} loop.ema; "
                             "resume with the run's loop.ema (RUN/config.yaml)")
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
        if self.private is not None:
            self.private.load(step_dir)
        self.elapsed = float(state.get("elapsed_s", 0.0))
        rng_path = step_dir / ckpt_io.rng_file(self.info.rank)
        if rng_path.is_file():
            rng = ckpt_io.load_torch(rng_path)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train (or resume) to the end of the budget or ``loop.stop_at_step``; returns the run dir."""
        cfg, loop, info = self.cfg, self.cfg.loop, self.info
        found = self._open_run()
        if found and self.budget.done(self.step, self.elapsed) and (self.out / MANIFEST).is_file():
            log.info("%s already finished its budget (%s) at step %d; nothing to do (raise the budget "
                     "to train on)", self.out, self.budget.describe(), self.step)
            return self.out
        if found:
            log.info("resumed from %s (step %d, %.0f s of training)", found[1], self.step, self.elapsed)
        if info.is_main:
            self._record_start(fresh=found is None)
        peak = resolve_peak(self.device, loop.peak_flops, self.out / "hardware.json", measure=info.is_main)
        log.info("MFU against a peak of %s per device", peak.describe())
        log.info("training %s (%.1fM parameters) for %s: %d sequences x %d tokens x %d micro-batches "
                 "x %d ranks = %d tokens per step, precision %s", cfg.family, self.num_params / 1e6,
                 self.budget.describe(), loop.micro_batch, self.seq_len, self.accum, info.world,
                 self.loader.tokens_per_step, self.precision.name)
        run = RunLog(time.perf_counter(), self.tokens_seen, peak)
        metrics = MetricsLog(self.out, self.step, enabled=info.is_main, tensorboard=loop.tensorboard,
                             trackers=loop.trackers, config=cfg)
        bar = tqdm(total=None if loop.max_minutes else self.budget.total_steps, initial=self.step, desc="train",
                   unit="step", dynamic_ncols=True, disable=True if not info.is_main else None)
        try:
            finished = self._run_steps(run, metrics, bar)
        finally:
            bar.close()
            metrics.close()
        if not finished:
            log.info("stopped at step %d (loop.stop_at_step); rerun the same command to resume", self.step)
            return self.out
        if info.is_main:
            run.write_manifest(self)
        barrier(info)
        return self.out

    def _open_run(self) -> tuple[int, Path] | None:
        """``--restart``, then resume from the newest intact checkpoint (after checking it is
        this run: ``training/resume.py``) or refuse to overwrite one; the checkpoint found."""
        out, info = self.out, self.info
        if self.cfg.restart and out.exists():
            if info.is_main:
                discard_run(out)
            barrier(info)
        cfg = self.cfg = replace(self.cfg, restart=False)  # an action, not part of the run's config
        found = ckpt_io.find_resumable(out) if out.exists() else None
        if found and not cfg.resume:
            raise ValueError(f"output {out} already holds checkpoints; give a new --output, resume=true or --restart")
        if found:
            require_same_run(out, cfg)
            self.load(found[1])
        return found

    def _record_start(self, fresh: bool) -> None:
        """What the run dir holds while training (rank 0): no manifest, the tokenizer, the config,
        and on a fresh start the content hash of the data."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        if fresh:  # no checkpoint of what was there (another stage's) outlives a fresh start
            discard_run(out, "a fresh start")
        clear_manifest(out)  # training on: the old manifest no longer describes the run
        shutil.copytree(self.train_split.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(self.cfg))
        if fresh:
            record_run_inputs(out, self.cfg.data)

    def _run_steps(self, run: RunLog, metrics: MetricsLog, bar: Any) -> bool:
        """The loop: step, log, evaluate, save until the budget ends (True) or a stop request."""
        loop, budget = self.cfg.loop, self.budget
        finished = budget.done(self.step, self.elapsed)
        stopped = bool(loop.stop_at_step) and self.step >= loop.stop_at_step
        while not (finished or stopped):
            with self._budget_time():
                t0, tokens_before = time.perf_counter(), self.tokens_seen
                run.last = self.train_step()
                run.train_time += time.perf_counter() - t0
                run.window_tokens += self.tokens_seen - tokens_before
            finished = budget.done(self.step, self._agreed_elapsed())
            stopped = bool(loop.stop_at_step) and self.step >= loop.stop_at_step
            row = run.train_row(self, bar) if self.step % loop.log_every == 0 or finished or stopped else {}
            # periodic evaluations and checkpoints count towards a time budget; the final ones not
            with self._budget_time(counts=not finished):
                if loop.eval_every and (self.step % loop.eval_every == 0 or finished):
                    run.evals = self.evaluate()
                    row = {**(row or {"step": self.step, "loss": round(run.last.loss, 6), "lr": run.last.lr,
                                      "tokens": self.tokens_seen}), **run.evals}
                    run.window_t = time.perf_counter()  # keep eval time out of tokens/s
                if row:
                    metrics.write(row)
            with self._budget_time(counts=not finished):
                if self.step % loop.save_every == 0 or finished or stopped:
                    self.save()
                    run.window_t = time.perf_counter()
            bar.update(1)
        return finished

    @contextlib.contextmanager
    def _budget_time(self, counts: bool = True) -> Iterator[None]:
        """Add the block's seconds (``self.clock``) to ``elapsed``, the time budget's count."""
        t = self.clock() if counts else 0.0
        yield
        if counts:
            self.elapsed += self.clock() - t

    def _agreed_elapsed(self) -> float:
        """The budget seconds used; under torchrun with a time budget the ranks' mean (one
        all-reduce per step), so every rank stops after the same step."""
        if self.info.enabled and self.cfg.loop.max_minutes:
            t = torch.tensor([self.elapsed], dtype=torch.float64, device=self.device)
            self.elapsed = float(all_reduce_sum(t, self.info)) / self.info.world
        return self.elapsed


def run_train(cfg: TrainConfig) -> Path:
    """Train (or resume) into ``cfg.output``; returns the run directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    info = init_distributed(cfg.loop.device)
    try:
        return Trainer(cfg, info).fit()
    finally:
        if launched:
            close_distributed()

