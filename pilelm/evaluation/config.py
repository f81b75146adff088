"""``EvalConfig``: the options of ``pilelm eval`` (both tasks: BPB per component, retrieval)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pilelm.core.config import require_at_least
from pilelm.data.prepared import SPLITS


@dataclass
class EvalConfig:
    runs: list[str] = field(default_factory=list)
    """Run directories to compare (or checkpoint dirs RUN/checkpoints/step_N); the latest step of each run."""
    data: str = ""
    """Shard dir (pilelm tokenize output) or prepared dir (pilelm prepare output) to score."""
    output: str = ""
    """Output folder (-o): results.json, results.md, bpb.png."""
    split: str = "test"
    """Split of the data to score (train, val or test)."""
    context: int = 0
    """Window length in tokens; 0 = each model's context (block_size)."""
    stride: int = 0
    """Sliding-window stride in tokens; 0 = half the window. Smaller gives more context per token, costs more."""
    max_documents: int = 0
    """Score only the first N documents of the split (0 = all)."""
    batch_tokens: int = 0
    """Tokens per forward pass (windows are batched by length); 0 = as many as keep the logits near 256 MB."""
    all_checkpoints: bool = False
    """Score every completed checkpoint of each run, not only the latest (learning curves side by side)."""
    unigram: bool = True
    """Also score the add-one-smoothed unigram baseline from the data's train split."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda or cuda:N."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the models (log-softmax is always float32)."""
    bleu_data: str = ""
    """A JSONL file of {"prompt", "reference"} (reference: string or list) pairs for BLEU and chrF; empty = none."""
    bleu_max_new_tokens: int = 64
    """BLEU: most tokens generated per prompt (greedy decoding)."""
    bleu_num_beams: int = 1
    """BLEU: beam search with this many beams (1 = greedy)."""
    bleu_stop: list[str] = field(default_factory=lambda: ["\n"])
    """BLEU: a completion ends at the first of these strings (\\n, \\t, \\r are unescaped)."""
    bleu_batch_size: int = 16
    """BLEU: prompts generated together."""
    task: Literal["bpb", "retrieval"] = "bpb"
    """bpb: bits per byte per component; retrieval: find StackExchange answers for their questions (recall@k, MRR@10, next to BM25)."""
    pooling: Literal["mean", "last", "cls"] = "mean"
    """retrieval: how token states become one vector (cls: BERT only)."""

    def __post_init__(self) -> None:
        require_at_least(self, 0, ("context", "stride", "max_documents", "batch_tokens"))
        if self.bleu_max_new_tokens < 1 or self.bleu_num_beams < 1 or self.bleu_batch_size < 1:
            raise ValueError("bleu_max_new_tokens, bleu_num_beams and bleu_batch_size must be >= 1")
        if self.split not in SPLITS:
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
