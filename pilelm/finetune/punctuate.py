"""``pilelm punctuate FT_DIR``: restore punctuation and casing with a ``--task punct`` model.

Reads text from files (each file one text) or stdin (each paragraph, i.e. block of lines
separated by a blank line, one text) and writes each restored text, paragraphs separated by a
blank line, to stdout or ``-o FILE``. A text longer than the model's ``max_length`` is cut
into consecutive windows of whole words.

The model adds marks and capitals; it never takes one away (``keep_existing``): a word that
already ends in a mark keeps it, and a capital stays a capital, since the model reads only
lower-cased, stripped words and cannot know a full stop or a proper noun was there. Restoring
partly punctuated text therefore only fills gaps.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pilelm.core.atomic import atomic_write_text
from pilelm.finetune.predict import Predictor, keep_existing, task_of

log = logging.getLogger(__name__)

__all__ = ["Punctuator", "PunctuateConfig", "keep_existing", "run_punctuate"]


class Punctuator(Predictor):
    """A loaded punctuation model: ``restore_texts(texts)`` -> texts with marks and capitals."""

    def __init__(self, ft_dir: str | Path, device: str = "auto", batch_size: int = 32):
        task = task_of(ft_dir)
        if task != "punct":
            raise ValueError(f"{ft_dir} was fine-tuned for {task!r}, not punct; "
                             "train one with pilelm finetune RUN --task punct --data PREPARED_DIR -o FT_DIR")
        super().__init__(ft_dir, device, batch_size)

    def restore_texts(self, texts: list[str]) -> list[str]:
        return self.punctuate(texts)


@dataclass
class PunctuateConfig:
    model: str = ""
    """A `pilelm finetune --task punct` output directory."""
    inputs: list[str] = field(default_factory=list)
    """Text files, each restored as one text; none = read stdin (paragraphs separated by blank lines)."""
    output: str = ""
    """Write the restored text here (-o); empty = stdout."""
    batch_size: int = 32
    """Windows of words per forward pass."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def read_paragraphs(text: str) -> list[str]:
    return [p for p in (" ".join(block.split()) for block in text.split("\n\n")) if p]


def run_punctuate(cfg: PunctuateConfig) -> None:
    if not cfg.model:
        raise ValueError("punctuate needs a model: pilelm punctuate FT_DIR [FILE...]")
    punctuator = Punctuator(cfg.model, cfg.device, cfg.batch_size)
    if cfg.inputs:
        texts = [Path(p).read_text(encoding="utf-8") for p in cfg.inputs]
    else:
        texts = read_paragraphs(sys.stdin.read())
    restored = "\n\n".join(punctuator.restore_texts(texts)) + "\n"
    if cfg.output:
        atomic_write_text(cfg.output, restored)
        log.info("wrote %d restored texts to %s", len(texts), cfg.output)
    else:
        sys.stdout.write(restored)
