"""A fine-tuned classifier, tagger or punctuation model applied to new texts.

``Predictor(FT_DIR)`` loads a ``pilelm finetune --task classify|ner|punct`` output and answers:

- ``classify(texts, top_k)``: per text ``{"label", "score", "top_k": [{"label", "score"}, ...]}``
  (softmax probabilities, best first);
- ``tag(texts)``: per text the entity spans as transformers'
  ``pipeline("token-classification", aggregation_strategy="simple")`` returns them:
  ``{"entity_group", "score", "word", "start", "end"}`` with character offsets into the text,
  the score the mean of the entity's word scores;
- ``punctuate(texts)``: the texts with punctuation and capitals restored.

Texts are batched by length (little padding). A text longer than the model's ``max_length``
is truncated for classification (as in training) and tagged window by window for ner and
punct, so every word gets a label. NER reads raw text as words the way CoNLL files are written:
runs of letters and digits (with inner apostrophes, dots and hyphens) and single punctuation
marks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import torch

from pilelm.core.config import require_at_least
from pilelm.core.manifest import require_stage
from pilelm.core.progress import Progress
from pilelm.finetune.encoding import IGNORE, TaskEncoder, collate
from pilelm.finetune.model import load_task_model
from pilelm.finetune.punct import label_text, restore, split_label
from pilelm.finetune.records import read_text_records
from pilelm.training.distributed import pick_device

log = logging.getLogger(__name__)

HEAD_TASKS = ("classify", "ner", "punct")
_WORD = re.compile(r"\w+(?:['\u2019.\-]\w+)*|[^\w\s]")


def task_of(ft_dir: str | Path) -> str:
    """The task a fine-tuning directory was trained for (its manifest's ``extra.task``)."""
    manifest = require_stage(ft_dir, "finetune", what="fine-tuned model")
    return str(manifest.get("extra", {}).get("task", ""))


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) of each CoNLL-style word of ``text``."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


class Predictor:
    """A loaded ``classify`` / ``ner`` / ``punct`` fine-tune, on ``device`` (auto: cuda if any)."""

    def __init__(self, ft_dir: str | Path, device: str = "auto", batch_size: int = 32):
        from pilelm.tokens.tokenizer import load_tokenizer

        self.ft_dir = Path(ft_dir)
        self.task = task_of(self.ft_dir)
        if self.task not in HEAD_TASKS:
            raise ValueError(f"{self.ft_dir} was fine-tuned for {self.task!r}; predict reads "
                             f"{', '.join(HEAD_TASKS)} models (an sft run chats: pilelm chat {self.ft_dir})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = pick_device(device)
        self.model = load_task_model(self.ft_dir / "best", self.device)
        self.head = self.model.head
        self.encoder = TaskEncoder(load_tokenizer(self.ft_dir / "tokenizer"), self.model.causal, self.head.max_length)
        self.labels = self.head.labels
        self.batch_size = batch_size

    def _require(self, *tasks: str) -> None:
        if self.task not in tasks:
            raise ValueError(f"{self.ft_dir} is a {self.task} model; this call needs a {' or '.join(tasks)} model")

    # --- sequence classification ----------------------------------------------------------

    @torch.inference_mode()
    def class_logits(self, texts: list[str]) -> torch.Tensor:
        """(N, n_labels) logits, float32 on the CPU."""
        self._require("classify")
        enc = self.encoder
        ids = [enc.prefix + row[: enc.room] + enc.suffix for row in enc.tok.encode_batch(list(texts))]
        out = torch.zeros(len(ids), len(self.labels))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), T), enc.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            out[idx] = self.model(batch.to(self.device), mask.to(self.device)).float().cpu()
        return out

    def class_probabilities(self, texts: list[str]) -> torch.Tensor:
        """(N, n_labels) softmax probabilities, float32 on the CPU."""
        return self.class_logits(texts).softmax(-1)

    def classify(self, texts: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        probs = self.class_probabilities(texts)
        k = max(1, min(top_k, len(self.labels)))
        values, indices = probs.topk(k, dim=-1)
        out = []
        for v, i in zip(values.tolist(), indices.tolist(), strict=True):
            ranked = [{"label": self.labels[j], "score": p} for p, j in zip(v, i, strict=True)]
            out.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked})
        return out

    # --- token classification -------------------------------------------------------------

    def _windows(self, words: list[str]) -> list[list[str]]:
        """Consecutive runs of whole words that each fit the model's max_length."""
        out, start = [], 0
        while start < len(words):
            kept = max(1, self.encoder.encode_words(words[start:start + self.encoder.room]).words)
            out.append(words[start:start + kept])
            start += kept
        return out

    @torch.inference_mode()
    def tag_words(self, word_lists: list[list[str]]) -> list[list[tuple[str, float]]]:
        """(label, probability) of every word of every list (each word labelled at its first token)."""
        self._require("ner", "punct")
        windows = [(t, j, w) for t, words in enumerate(word_lists) for j, w in enumerate(self._windows(words))]
        pieces: dict[tuple[int, int], list[tuple[str, float]]] = {}
        by_length = sorted(windows, key=lambda x: len(x[2]))  # similar lengths batch together
        for start in range(0, len(by_length), self.batch_size):
            chunk = by_length[start:start + self.batch_size]
            batch = collate([self.encoder.encode_words(w) for _, _, w in chunk], self.encoder.pad_id)
            logits = self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            prob, pred = logits.float().softmax(-1).max(-1)
            for row, (t, j, _) in enumerate(chunk):
                first = batch["labels"][row] != IGNORE
                pieces[(t, j)] = [(self.labels[i], p) for i, p in
                                  zip(pred[row][first].tolist(), prob[row][first].tolist(), strict=True)]
        out: list[list[tuple[str, float]]] = [[] for _ in word_lists]
        for t, j, _ in windows:  # reading order
            out[t] += pieces[(t, j)]
        return out

    def tag(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        """Entity spans per text (``aggregation_strategy="simple"``)."""
        self._require("ner")
        spans = [word_spans(t) for t in texts]
        tagged = self.tag_words([[w for w, _, _ in s] for s in spans])
        return [group_entities(text, s, tags) for text, s, tags in zip(texts, spans, tagged, strict=True)]

    def punctuate(self, texts: list[str]) -> list[str]:
        """The texts with marks and capitals added; a mark or capital a text has is kept
        (``keep_existing``)."""
        self._require("punct")
        given = [label_text(t) for t in texts]
        tagged = self.tag_words([g.words for g in given])
        return [restore(g.words, keep_existing(g.labels, [label for label, _ in tags]))
                for g, tags in zip(given, tagged, strict=True)]

    def predict(self, texts: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        """One JSON-ready record per text for this model's task."""
        if self.task == "classify":
            return self.classify(texts, top_k)
        if self.task == "ner":
            return [{"entities": e} for e in self.tag(texts)]
        return [{"restored": t} for t in self.punctuate(texts)]


def keep_existing(existing: list[str], predicted: list[str]) -> list[str]:
    """Per word: the text's own mark where it has one, else the model's; a capital where either has one."""
    out = []
    for old, new in zip(existing, predicted, strict=True):
        (old_mark, old_case), (new_mark, new_case) = split_label(old), split_label(new)
        mark = old_mark if old_mark != "O" else new_mark
        out.append(f"{mark}+{'Cap' if 'Cap' in (old_case, new_case) else 'lower'}")
    return out


def group_entities(text: str, spans: list[tuple[str, int, int]], tags: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Words with BIO/BIOES tags -> entities, as transformers' ``simple`` aggregation groups
    them: a ``B-``/``S-`` tag, or a change of type, starts a new entity; ``O`` ends one."""
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    scores: list[float] = []

    def close() -> None:
        nonlocal current
        if current is not None:
            current["score"] = sum(scores) / len(scores)
            current["word"] = text[current["start"]:current["end"]]
            entities.append(current)
        current = None
        scores.clear()

    for (_, start, end), (tag, score) in zip(spans, tags, strict=False):
        prefix, _, kind = tag.partition("-")
        if tag == "O" or not kind:
            close()
            continue
        if current is None or prefix in ("B", "S") or current["entity_group"] != kind:
            close()
            current = {"entity_group": kind, "score": 0.0, "word": "", "start": start, "end": end}
        current["end"] = end
        scores.append(score)
        if prefix in ("E", "S"):
            close()
    close()
    return entities


# ---------------------------------------------------------------------------------------------
# The `pilelm predict` stage

CHUNK_TEXTS = 1024
"""Texts predicted (and written) together: output appears as it is made, memory stays flat."""


@dataclass
class PredictConfig:
    model: str = ""
    """A `pilelm finetune --task classify|ner|punct` output directory."""
    texts: list[str] = field(default_factory=list)
    """Texts to predict (bare arguments after FT_DIR); none and no data = one text per line of stdin."""
    data: list[str] = field(default_factory=list)
    """Files of texts: JSONL/CSV/Parquet (the text in text_column) or .txt (one text per line)."""
    text_column: str = "text"
    """Column (JSON: dotted field) holding the text in data files, as for finetune."""
    output: str = ""
    """Write the JSONL predictions here (-o); empty = stdout."""
    top_k: int = 1
    """classify: how many labels (best first) each prediction's top_k lists."""
    batch_size: int = 32
    """Texts (ner, punct: windows of words) per forward pass."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    threads: int = 0
    """Torch intra-op threads; 0 = torch's default."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("top_k", "batch_size"))
        require_at_least(self, 0, ("threads",))


def read_texts(cfg: PredictConfig, stdin: TextIO | None = None) -> list[str]:
    """The texts of a predict run: arguments, then files, else stdin (one per non-blank line)."""
    texts = list(cfg.texts)
    for name in cfg.data:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        if path.suffix == ".txt":
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            texts += [r.text for r in read_text_records(path, cfg.text_column, cfg.text_column)]
    if not texts and not cfg.data:
        texts = [line.rstrip("\n") for line in (stdin or sys.stdin) if line.strip()]
    return texts


def run_predict(cfg: PredictConfig) -> Path | None:
    """Predict every text and write one JSON object per line (``text`` first, then the task's
    fields); returns the output path when one was given."""
    if not cfg.model:
        raise ValueError('predict needs a fine-tuned model: pilelm predict FT_DIR "a text" [--data FILE]')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    predictor = Predictor(cfg.model, cfg.device, cfg.batch_size)
    texts = read_texts(cfg)
    sink: IO[str] = sys.stdout
    tmp = Path(f"{cfg.output}.tmp") if cfg.output else None
    if tmp is not None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        sink = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed below, then renamed)
    try:
        with Progress(len(texts), f"predict {predictor.task}", "texts") as progress:
            for start in range(0, len(texts), CHUNK_TEXTS):
                chunk = texts[start:start + CHUNK_TEXTS]
                for text, rec in zip(chunk, predictor.predict(chunk, cfg.top_k), strict=True):
                    sink.write(json.dumps({"text": text, **rec}, ensure_ascii=False) + "\n")
                sink.flush()
                progress.update(len(chunk))
    finally:
        if tmp is not None:
            sink.close()
    if tmp is None:
        return None
    os.replace(tmp, cfg.output)
    log.info("wrote %d predictions to %s", len(texts), cfg.output)
    return Path(cfg.output)
