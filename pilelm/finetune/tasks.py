"""The fine-tuning tasks: how each reads its data, what its head is, how it is scored.

``TASKS`` is the one place a task registers (``register_task``); ``pilelm finetune --task NAME``
looks it up there. A head task gives a head kind (``sequence`` or ``token``), a loader that
turns the user's files into encoded train/val/test examples with their gold answers, and a
scorer. A task with a training loop of its own (``sft``: the causal LM on conversations;
``contrastive``: pooled states for retrieval) names its runner instead, ``module:function``
taking the ``FinetuneConfig``, imported only when the task runs.

Splits: ``data`` may be a prepared directory (``pilelm prepare`` output: its own train/val/test
splits, made by document) or files; files not given as ``val_data`` / ``test_data`` are split
by record with a seeded shuffle (``val_ratio``, ``test_ratio``). A classification record is a
whole document (its first ``max_length`` tokens), so documents never straddle splits.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pilelm.data.prepared import SPLITS, is_prepared, split_files
from pilelm.finetune import punct as punct_labels
from pilelm.finetune.encoding import Encoded, TaskEncoder
from pilelm.finetune.metrics import classification_metrics, entity_metrics, punctuation_metrics
from pilelm.finetune.records import DataError, TextRecord, read_text_records, require_one_label_kind
from pilelm.finetune.tags import TaggedSentence, detect_scheme, iter_checked, read_tagged

log = logging.getLogger(__name__)


class _Seeded(Protocol):
    @property
    def seed(self) -> int: ...


class TaskSource(Protocol):
    """What a task's loader reads of the ``FinetuneConfig`` (see its field docs). The config
    checks ``--task`` against this table, so the table names what it reads instead of
    importing the config."""

    @property
    def data(self) -> list[str]: ...
    @property
    def val_data(self) -> list[str]: ...
    @property
    def test_data(self) -> list[str]: ...
    @property
    def text_column(self) -> str: ...
    @property
    def label_column(self) -> str: ...
    @property
    def val_ratio(self) -> float: ...
    @property
    def test_ratio(self) -> float: ...
    @property
    def scheme(self) -> str: ...
    @property
    def words_per_example(self) -> int: ...
    @property
    def max_train_examples(self) -> int: ...
    @property
    def max_eval_examples(self) -> int: ...
    @property
    def loop(self) -> _Seeded: ...


@dataclass
class TaskData:
    labels: tuple[str, ...]
    examples: dict[str, list[Encoded]]
    gold: dict[str, list[Any]]
    """Per split: a sequence task's label ids, a token task's label names per word."""
    scheme: str = ""
    counts: Counter[str] = field(default_factory=Counter)
    inputs: dict[str, list[Any]] = field(default_factory=dict)
    """Per split, what the model reads before encoding: a sequence task's texts, a token task's
    words per example (the classical baselines of ``finetune.baselines`` train on these)."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["sequence", "token", "causal", "embedding"]
    load: Callable[[TaskSource, TaskEncoder], TaskData] | None
    score: Callable[[list[Any], list[Any], tuple[str, ...]], dict[str, Any]] | None
    summary: str
    runner: str = ""
    """``module:function`` running the whole task from the config (tasks that are not a head)."""
    options: tuple[str, ...] = ()
    """The task-specific keys it reads (``config.TASK_OPTIONS``); setting another is refused."""

    def load_runner(self) -> Callable[[Any], Path] | None:
        """The runner, which takes the whole ``FinetuneConfig``."""
        if not self.runner:
            return None
        import importlib

        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    TASKS[task.name] = task


# --- where each split's records come from ------------------------------------------------


def prepared_dir(paths: list[str]) -> Path | None:
    """The prepared directory among ``paths`` (a single ``pilelm prepare`` output), else None."""
    return Path(paths[0]) if len(paths) == 1 and is_prepared(paths[0]) else None


def split_sources(cfg: TaskSource, read: Callable[[list[Path]], list[Any]],
                  require_val: bool = True) -> dict[str, list[Any]]:
    """train/val/test items: a prepared dir's splits, explicit files, or a seeded ratio split.
    ``require_val=False``: a task that can train without validation (keeping the newest model)."""
    explicit = {"val": cfg.val_data, "test": cfg.test_data}
    prep = prepared_dir(cfg.data)
    if prep is not None:
        out = {s: read(split_files(prep, s)) for s in SPLITS}
    else:
        pool = read([Path(p) for p in cfg.data])
        random.Random(cfg.loop.seed).shuffle(pool)
        n = len(pool)
        cut_test = 0 if explicit["test"] else round(n * cfg.test_ratio)
        cut_val = 0 if explicit["val"] else round(n * cfg.val_ratio)
        out = {"test": pool[:cut_test], "val": pool[cut_test:cut_test + cut_val],
               "train": pool[cut_test + cut_val:]}
    for split, files in explicit.items():
        if files:
            out[split] = read([Path(p) for p in files])
    if not out["train"]:
        raise DataError(f"no training examples in {', '.join(cfg.data)}")
    if not out["val"] and require_val:
        raise DataError("no validation examples: give --val-data FILE or a val_ratio > 0 "
                        "(early stopping and the best checkpoint need them)")
    rng = random.Random(cfg.loop.seed + 1)
    caps = {"train": cfg.max_train_examples, "val": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    for split, cap in caps.items():
        if cap and len(out[split]) > cap:
            out[split] = rng.sample(out[split], cap)
    return out


def label_ids(labels: tuple[str, ...], label: str, where: str) -> int:
    try:
        return labels.index(label)
    except ValueError:
        raise DataError(f"{where}: label {label!r} does not occur in the training data "
                        f"(labels: {', '.join(labels)}); fix the file or add training examples") from None


# --- classify ------------------------------------------------------------------------------


def load_classify(cfg: TaskSource, enc: TaskEncoder) -> TaskData:
    counts: Counter[str] = Counter()

    def read(files: list[Path]) -> list[TextRecord]:
        return [r for f in files for r in read_text_records(f, cfg.text_column, cfg.label_column, counts)]

    splits = split_sources(cfg, read)
    require_one_label_kind([r for records in splits.values() for r in records])
    labels = tuple(sorted({r.label for r in splits["train"]}))
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} label(s) in {cfg.label_column!r}; need >= 2")
    data = TaskData(labels, {}, {}, counts=counts)
    for split, records in splits.items():
        ids = [label_ids(labels, r.label, r.where) for r in records]
        data.examples[split] = [enc.encode_text(r.text, i) for r, i in zip(records, ids, strict=True)]
        data.gold[split] = ids
        data.inputs[split] = [r.text for r in records]
    return data


def score_classify(gold: list[int], pred: list[int], labels: tuple[str, ...]) -> dict[str, Any]:
    return classification_metrics(gold, pred, list(labels))


# --- ner -----------------------------------------------------------------------------------


def load_ner(cfg: TaskSource, enc: TaskEncoder) -> TaskData:
    def read(files: list[Path]) -> list[TaggedSentence]:
        return [s for f in files for s in read_tagged(f)]

    splits = split_sources(cfg, read)
    scheme = detect_scheme(splits["train"]) if cfg.scheme == "auto" else cfg.scheme
    labels = tuple(sorted({t for s in splits["train"] for t in s.tags} | {"O"}))
    data = TaskData(labels, {}, {}, scheme=scheme)
    for split, sentences in splits.items():
        examples, gold, words = [], [], []
        for s in iter_checked(sentences, scheme):
            ids = [label_ids(labels, t, w) for t, w in zip(s.tags, s.where, strict=True)]
            e = enc.encode_words(s.tokens, ids)
            data.counts["truncated_words"] += len(s.tokens) - e.words
            examples.append(e)
            gold.append(list(s.tags))
            words.append(list(s.tokens))
        data.examples[split], data.gold[split], data.inputs[split] = examples, gold, words
    return data


def score_ner(gold: list[list[str]], pred: list[list[str]], labels: tuple[str, ...]) -> dict[str, Any]:
    return entity_metrics(gold, pred)


# --- punct ---------------------------------------------------------------------------------


def load_punct(cfg: TaskSource, enc: TaskEncoder) -> TaskData:
    """Examples of ``words_per_example`` words from every document; labels from the text."""

    def read(files: list[Path]) -> list[punct_labels.LabelledWords]:
        out = []
        for f in files:
            if f.suffix == ".txt":
                texts = [f.read_text(encoding="utf-8")]
            else:
                texts = [r.text for r in read_text_records(f, cfg.text_column, cfg.text_column)]
            for text in texts:
                lw = punct_labels.label_text(text)
                n = cfg.words_per_example
                out += [punct_labels.LabelledWords(lw.words[i:i + n], lw.labels[i:i + n])
                        for i in range(0, len(lw.words), n) if lw.words[i:i + n]]
        return out

    splits = split_sources(cfg, read)
    labels = punct_labels.LABELS
    data = TaskData(labels, {}, {})
    for split, items in splits.items():
        examples = [enc.encode_words(x.words, [labels.index(t) for t in x.labels]) for x in items]
        data.counts["truncated_words"] += sum(len(x.words) - e.words for x, e in zip(items, examples, strict=True))
        data.examples[split], data.gold[split] = examples, [x.labels for x in items]
        data.inputs[split] = [x.words for x in items]
    return data


def score_punct(gold: list[list[str]], pred: list[list[str]], labels: tuple[str, ...]) -> dict[str, Any]:
    return punctuation_metrics([t for s in gold for t in s], [t for s in pred for t in s])


register_task(Task("classify", "sequence", load_classify, score_classify,
                   "text classification: accuracy, macro-F1, confusion matrix",
                   options=("text_column", "label_column", "head.pooling", "head.dropout")))
register_task(Task("ner", "token", load_ner, score_ner,
                   "named-entity recognition (BIO/BIOES): entity P/R/F1 per type (seqeval)",
                   options=("scheme", "head.dropout")))
register_task(Task("punct", "token", load_punct, score_punct,
                   "punctuation and casing restoration: per-mark P/R/F1, micro-F1",
                   options=("text_column", "words_per_example", "head.dropout")))
register_task(Task("sft", "causal", None, None,
                   "supervised fine-tuning on conversations (summaries, dialogue): ROUGE, BLEU/chrF, reply loss",
                   runner="pilelm.finetune.sft.stage:run_sft", options=("sft",)))
register_task(Task("contrastive", "embedding", None, None,
                   "pooled states for retrieval: in-batch InfoNCE on query/positive pairs (JSONL) or mined pairs",
                   runner="pilelm.retrieval.contrastive:run_contrastive_task",
                   options=("head.pooling", "head.dropout", "contrastive")))
