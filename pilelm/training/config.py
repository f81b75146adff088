"""The ``pilelm train`` config: the model sections users type, optimizer, schedule and loop.

``family`` picks the model family; its config comes from that family's section (``model`` for
gpt, ``bert`` for bert: ``ModelSpec.config_section``), so ``TrainConfig.model_config`` and
``TrainConfig.spec`` are all the trainer reads. The sections are not written here: there is
one per family registered in ``pilelm.models`` (``ModelSpec.config_cls`` under
``config_section``) when this module is imported, so a new family adds its section (with its
field docs in ``--help`` and its unknown-key errors) without an edit of this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

from pilelm.core.config import from_dict, require_at_least
from pilelm.models import ModelSpec, families, get_spec
from pilelm.models.spec import Objective, close_registry
from pilelm.training.optim import OptimConfig, ScheduleConfig
from pilelm.training.privacy_config import PrivacyConfig


@dataclass
class LoopConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (the schedule spans them, or the smaller budget below)."""
    max_tokens: int = 0
    """Token budget: stop after ceil(max_tokens / tokens per step) steps if that is fewer than
    max_steps; the schedule spans that many steps. 0 = off."""
    max_minutes: float = 0.0
    """Wall-clock budget of the training loop in minutes (evaluations and checkpoints count,
    start-up does not; time before a stop or kill counts after resuming). The schedule spans
    the fraction of the budget used (wsd: decay in the last schedule.decay_frac). 0 = off."""
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
    """Peak FLOP/s per device for MFU; 0 = the datasheet peak of a known GPU, else the best of
    several bf16 matmul measurements (the best ever seen is kept in RUN/hardware.json)."""
    window_start: Literal["stride", "document"] = "stride"
    """Causal LM training windows: stride (every block_size tokens of the packed stream) or
    document (each starts at a document's first token, or block_size further on inside a long one)."""
    seq_len_warmup: float = 0.0
    """Causal LMs: the first this fraction of the budget trains on short windows (each window cut
    into 4 in its first third, into 2 in its second), then on full ones; the same tokens per step,
    cheaper attention early (sequence-length warmup, as in Li et al. 2022). 0 = off."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (e.g. 0.998) that validation
    uses and checkpoints save as the model (the raw weights go in train_state); 0 = off."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN/tensorboard."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that also get every metrics row: mlflow (a local SQLite store, RUN/mlflow.db) and/or wandb (offline, RUN/wandb); each needs pip install 'pilelm[track]'."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("max_steps", "micro_batch"), prefix="loop.")
        if self.max_minutes < 0 or self.max_tokens < 0:
            raise ValueError("loop.max_minutes and loop.max_tokens must be >= 0 (0 = no such budget)")
        if not 0.0 <= self.seq_len_warmup <= 1.0:
            raise ValueError(f"loop.seq_len_warmup must be a fraction of the budget in [0, 1], got {self.seq_len_warmup}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"loop.ema must be in [0, 1) (0 = off; e.g. 0.998), got {self.ema}")
        require_at_least(self, 0, ("tokens_per_step", "eval_every", "eval_windows", "keep_last", "num_threads", "stop_at_step"), prefix="loop.")
        require_at_least(self, 1, ("save_every", "log_every", "max_skips"), prefix="loop.")


@dataclass
class _RunAndFamily:
    data: Path = Path("")
    """Token shard directory (output of `pilelm tokenize`): trains on train.bin, validates on val.bin."""
    output: Path = Path("runs/train")
    """Run directory: checkpoints, metrics, TensorBoard logs, manifest."""
    family: str = "gpt"
    """The model family, configured by its section: gpt (causal LM; section model: GPT-2 / GPT-NeoX shape), bert (masked LM; section bert; bert.nsp=true adds next-sentence prediction), or another registered in pilelm.models."""


def _family_sections() -> type:
    """A dataclass with one field per registered family: its config section, typed by its config
    class (defaults = that class's). The registry closes here: a family registered later would
    have no section, so ``register`` refuses it."""
    close_registry("pilelm.training.config built TrainConfig's model sections")
    specs = [get_spec(name) for name in families()]
    return make_dataclass("FamilySections", [
        (spec.config_section, spec.config_cls, field(default_factory=spec.config_cls)) for spec in specs
    ], bases=(_RunAndFamily,))


@dataclass
class TrainConfig(_family_sections()):  # type: ignore[misc]  (a dataclass made from the registry)
    mask_prob: float = 0.15
    """bert: fraction of tokens chosen for prediction (80 % [MASK], 10 % random, 10 % kept)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Batching, precision, logging, evaluation and checkpoint cadence."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differentially private training (DP-SGD); off by default."""
    resume: bool = True
    """Resume from the newest intact checkpoint in the output directory if there is one (only with the config and data the run started with; see restart)."""
    restart: bool = False
    """Discard the run already in the output directory (checkpoints, metrics, manifest) and train anew: the way to retrain after changing the config or the data."""
    init_from: str = ""
    """Start from the weights of a run directory (its newest intact checkpoint) or of one checkpoint folder, e.g. what `pilelm import` wrote, instead of random ones. The model section comes from there (dropout from this config); optimizer, schedule and data order start fresh. A run that has checkpoints of its own resumes from them instead."""

    def __post_init__(self) -> None:
        if self.family not in families():
            raise ValueError(f"family {self.family!r} is not a registered model family; use one of "
                             f"{', '.join(families())}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.loop.seq_len_warmup and self.privacy.enabled:
            raise ValueError("loop.seq_len_warmup does not combine with privacy.enabled (DP-SGD samples whole "
                             "windows per example); set loop.seq_len_warmup=0")

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.family)

    @property
    def model_config(self) -> Any:
        """The config of the chosen family (its section)."""
        return getattr(self, self.spec.config_section)

    @property
    def objective(self) -> Objective:
        return self.spec.objective(self.model_config)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved TrainConfig a run was trained with (RUN/config.yaml)."""
    import yaml

    return from_dict(TrainConfig, yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))


def round_vocab(n: int, multiple: int = 64) -> int:
    """Vocabulary padded up to a multiple of 64: matmul-friendly shapes (nanoGPT: 50257 -> 50304)."""
    return (n + multiple - 1) // multiple * multiple
