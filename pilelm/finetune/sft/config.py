"""The ``sft`` section of ``pilelm finetune`` (``--task sft``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SftConfig:
    examples: Literal["", "lead", "title", "dialogue"] = ""
    """Empty: data holds JSONL conversations (prompt/response or messages). lead, title or dialogue: mine examples from Pile-format documents in data (a prepared dir or document files; empty data = the bundled sample)."""
    pack: bool = True
    """Pack several examples into each row of max_length tokens (a block-diagonal mask keeps them apart); false = one example per row, padded."""
    max_new_tokens: int = 64
    """Evaluation: the longest reply decoded."""
    num_beams: int = 1
    """Evaluation: 1 = greedy decoding, > 1 = beam search with this many beams."""
    eval_generations: int = 50
    """Evaluation: decode at most this many test (else validation) conversations for ROUGE/BLEU/chrF (0 = all)."""
    samples: int = 3
    """Side-by-side samples (prompt, reference, before, after) written to results.md."""
    before: bool = True
    """Also score the model as it starts (before fine-tuning) for the before/after table."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("sft.max_new_tokens and sft.num_beams must be >= 1")
        if self.eval_generations < 0 or self.samples < 0:
            raise ValueError("sft.eval_generations and sft.samples must be >= 0 (0 = all / none)")
