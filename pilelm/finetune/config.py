"""``pilelm finetune`` configuration (typed sections; every field's doc is its ``--help``)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from pilelm.core.config import require_at_least
from pilelm.finetune.model import Pooling
from pilelm.finetune.sft.config import SftConfig
from pilelm.finetune.tasks import TASKS
from pilelm.training.optim import OptimConfig, ScheduleConfig


@dataclass
class HeadConfig:
    pooling: Pooling = "auto"
    """Sequence tasks: auto (BERT cls, GPT last), last (the last non-pad token, as GPT2ForSequenceClassification), cls (BERT's [CLS] through its tanh pooler) or mean (the mean of the real tokens; no transformers class, so not exportable)."""
    dropout: float = 0.1
    """Dropout in the trunk and before the classifier during fine-tuning."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank (Hu et al. 2021) through peft; 0 = full fine-tuning. With r > 0 only the adapters and the head train, and the adapters are merged into the weights when saved."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    targets: list[str] = field(default_factory=list)
    """Names of the Linear layers to adapt (suffixes, e.g. attn.qkv); empty = every attention and MLP projection of the trunk."""

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("lora.r >= 0, lora.alpha > 0 and lora.dropout in [0, 1) are required")


@dataclass
class ContrastiveSection:
    temperature: float = 0.05
    """--task contrastive: softmax temperature of the in-batch InfoNCE logits."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"contrastive.temperature must be > 0, got {self.temperature}")


@dataclass
class FinetuneLoopConfig:
    max_steps: int = 300
    """Optimizer steps at most (early stopping may end sooner); the schedule spans the run's steps."""
    epochs: float = 0.0
    """Passes over the training data (fractions allowed); 0 = loop.max_steps alone. With both, the run ends at the first reached (as train's budgets): raise max_steps to train every epoch."""
    batch_size: int = 16
    """Examples per optimizer step."""
    group_by_length: bool = True
    """Batch training examples of similar length together (less padding, faster steps): each batch comes from a window of 50 batches of the shuffled epoch sorted by length, as transformers' group_by_length. false = plain shuffled batches."""
    eval_batch_size: int = 64
    """Examples per forward pass when evaluating."""
    eval_every: int = 50
    """Validate (and checkpoint) every this many steps, and at the end."""
    patience: int = 5
    """Stop after this many validations without a better validation metric; 0 = never stop early."""
    min_delta: float = 0.0
    """A validation metric must beat the best by more than this to count as better."""
    log_every: int = 10
    """Write train loss to metrics.jsonl / TensorBoard every this many steps."""
    seed: int = 1337
    """Seed of the head's initialisation, the data order, the splits and dropout."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16"] = "auto"
    """fp32; bf16-autocast (bf16 matmuls); bf16 (bf16 weights, fp32 masters); auto = bf16-autocast where bf16 is native, else fp32."""
    num_threads: int = 0
    """CPU intra-op threads; 0 keeps torch's default."""
    stop_at_step: int = 0
    """Checkpoint and stop after this step, as a preempted job would (rerun to resume); 0 = off."""
    tensorboard: bool = True
    """Write TensorBoard event files to FT_DIR/tensorboard."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that also get every metrics row: mlflow (a local SQLite store, FT_DIR/mlflow.db) and/or wandb (offline, FT_DIR/wandb); each needs pip install 'pilelm[track]'."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("max_steps", "batch_size", "eval_batch_size", "eval_every", "log_every"), prefix="loop.")
        require_at_least(self, 0, ("patience", "num_threads", "stop_at_step"), prefix="loop.")
        if self.epochs < 0:
            raise ValueError(f"loop.epochs must be >= 0 (0 = loop.max_steps alone), got {self.epochs}")


def _finetune_optim() -> OptimConfig:
    # BERT's fine-tuning recipe (Devlin et al. 2019, appendix A.3): Adam with beta2 0.999 and
    # weight decay 0.01; a higher peak lr than its 5e-5 suits the small models pilelm trains.
    return OptimConfig(lr=1e-4, beta2=0.999, weight_decay=0.01)


def _finetune_schedule() -> ScheduleConfig:
    return ScheduleConfig(kind="cosine", warmup_steps=20, min_lr_ratio=0.0)


@dataclass
class FinetuneConfig:
    run: str = ""
    """The pretrained run directory (`pilelm train` or `pilelm import` output, e.g. an imported Hugging Face model)."""
    task: str = "classify"
    """The task: classify, ner, punct, sft or contrastive (see docs/finetune.md and docs/sft.md)."""
    data: list[str] = field(default_factory=list)
    """Labelled files (classify: JSONL/CSV/Parquet; ner: CoNLL or JSONL {tokens, tags}; punct: .txt or JSONL text; sft: JSONL conversations, or documents with sft.examples), or one prepared directory whose train/val/test splits are used."""
    val_data: list[str] = field(default_factory=list)
    """Validation files; empty = val_ratio of the records of data (or a prepared dir's val split)."""
    test_data: list[str] = field(default_factory=list)
    """Test files; empty = test_ratio of the records of data (or a prepared dir's test split)."""
    output: str = ""
    """Fine-tuning directory to write (-o)."""
    text_column: str = "text"
    """Column (JSON: dotted field) holding the text (classify, and punct's JSONL)."""
    label_column: str = "label"
    """Column (JSON: dotted field, e.g. meta.pile_set_name) holding the label (classify)."""
    val_ratio: float = 0.1
    """Fraction of the records held out for validation when no val_data is given."""
    test_ratio: float = 0.1
    """Fraction of the records held out for testing when no test_data is given."""
    scheme: Literal["auto", "bio", "bioes"] = "auto"
    """ner: tag scheme; auto = bioes if any tag starts with S- or E-, else bio. Sequences that break it are errors."""
    max_length: int = 128
    """Tokens per example (special tokens included); longer texts are truncated (sft: the longest message before the reply is cut from its end, keeping its head; also the length of a packed row). At most the model's block_size."""
    words_per_example: int = 48
    """punct: words per training example (documents are cut into runs of this many words)."""
    max_train_examples: int = 0
    """Use at most this many training examples (a seeded sample); 0 = all."""
    max_eval_examples: int = 1000
    """Use at most this many validation and test examples each (a seeded sample); 0 = all."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Task head: pooling and dropout."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Optional LoRA (lora.r=8) instead of full fine-tuning."""
    sft: SftConfig = field(default_factory=SftConfig)
    """--task sft: mined examples, packing, evaluation decoding."""
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)
    """--task contrastive: the InfoNCE temperature (pooling is head.pooling; auto = mean)."""
    optim: OptimConfig = field(default_factory=_finetune_optim)
    """Optimizer (weight_decay is configurable here)."""
    schedule: ScheduleConfig = field(default_factory=_finetune_schedule)
    """Learning-rate schedule."""
    loop: FinetuneLoopConfig = field(default_factory=FinetuneLoopConfig)
    """Steps, batching, validation cadence, early stopping, precision."""
    resume: bool = True
    """Resume from the newest intact checkpoint in the output directory."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is unknown; use one of {', '.join(TASKS)}")
        for key in ("val_ratio", "test_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.val_ratio + self.test_ratio >= 1.0:
            raise ValueError("val_ratio + test_ratio must leave training data (< 1)")
        if self.max_length < 4 or self.words_per_example < 1:
            raise ValueError("max_length >= 4 and words_per_example >= 1 are required")
        if self.max_train_examples < 0 or self.max_eval_examples < 0:
            raise ValueError("max_train_examples and max_eval_examples must be >= 0 (0 = all)")
        refuse_unused_options(self)


# Keys only some tasks read (``Task.options`` says which); the others are in every task's loop.
TASK_OPTIONS = ("text_column", "label_column", "scheme", "words_per_example", "head.pooling", "head.dropout", "sft",
                "contrastive")


def refuse_unused_options(cfg: FinetuneConfig) -> None:
    """An option the task does not read, set to anything but its default, is refused by name
    (it would be silently ignored)."""
    task = TASKS[cfg.task]
    unused = []
    for key in TASK_OPTIONS:
        if key in task.options:
            continue
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name) if name else getattr(cfg, key)
        factory = {f.name: f for f in fields(FinetuneConfig)}[section]
        base = factory.default_factory() if factory.default_factory is not MISSING else factory.default
        if (getattr(base, name) if name else base) != value:
            unused.append(key)
    if unused:
        users = {k: [t.name for t in TASKS.values() if k in t.options] for k in unused}
        listed = "; ".join(f"{k} (read by {', '.join(users[k]) or 'no task'})" for k in unused)
        raise ValueError(f"task {cfg.task} does not use {listed}: remove it, or pick the task that reads it")
