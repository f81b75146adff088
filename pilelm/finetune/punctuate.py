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

import torch

from pilelm.core.atomic import atomic_write_text
from pilelm.core.manifest import require_stage
from pilelm.finetune.encoding import IGNORE, TaskEncoder, collate
from pilelm.finetune.model import load_task_model
from pilelm.finetune.punct import label_text, restore, split_label
from pilelm.training.distributed import pick_device

log = logging.getLogger(__name__)


def keep_existing(existing: list[str], predicted: list[str]) -> list[str]:
    """Per word: the text's own mark where it has one, else the model's; a capital where either has one."""
    out = []
    for old, new in zip(existing, predicted, strict=True):
        (old_mark, old_case), (new_mark, new_case) = split_label(old), split_label(new)
        mark = old_mark if old_mark != "O" else new_mark
        out.append(f"{mark}+{'Cap' if 'Cap' in (old_case, new_case) else 'lower'}")
    return out


class Punctuator:
    """A loaded punctuation model: ``restore_texts(texts)`` -> texts with marks and capitals."""

    def __init__(self, ft_dir: str | Path, device: str = "cpu", batch_size: int = 32):
        from pilelm.tokens.tokenizer import load_tokenizer

        ft_dir = Path(ft_dir)
        manifest = require_stage(ft_dir, "finetune", what="fine-tuned model")
        if manifest.get("extra", {}).get("task") != "punct":
            raise ValueError(f"{ft_dir} was fine-tuned for {manifest.get('extra', {}).get('task')!r}, not punct; "
                             "train one with pilelm finetune RUN --task punct --data PREPARED_DIR -o FT_DIR")
        self.device = pick_device(device)
        self.model = load_task_model(ft_dir / "best", self.device)
        head = self.model.head
        self.encoder = TaskEncoder(load_tokenizer(ft_dir / "tokenizer"), self.model.causal, head.max_length)
        self.labels = head.labels
        self.batch_size = batch_size

    def _windows(self, words: list[str]) -> list[list[str]]:
        out, start = [], 0
        while start < len(words):
            kept = max(1, self.encoder.encode_words(words[start:start + self.encoder.room]).words)
            out.append(words[start:start + kept])
            start += kept
        return out

    def restore_texts(self, texts: list[str]) -> list[str]:
        given = [label_text(text) for text in texts]
        windows = [(t, w) for t, lw in enumerate(given) for w in self._windows(lw.words)]
        labels: list[list[str]] = [[] for _ in texts]
        words: list[list[str]] = [[] for _ in texts]
        with torch.no_grad():
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start:start + self.batch_size]
                batch = collate([self.encoder.encode_words(w) for _, w in chunk], self.encoder.pad_id)
                logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                pred = logits.argmax(-1).cpu()
                for row, (t, w) in enumerate(chunk):
                    ids = pred[row][batch["labels"][row] != IGNORE].tolist()
                    labels[t] += [self.labels[i] for i in ids]
                    words[t] += w
        return [restore(w, keep_existing(g.labels, lab)) for w, lab, g in zip(words, labels, given, strict=True)]


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
    device: str = "cpu"
    """cpu, cuda or auto."""

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
