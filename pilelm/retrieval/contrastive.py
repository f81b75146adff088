"""Contrastive fine-tuning: make pooled states retrieve, with in-batch negatives (InfoNCE).

For a batch of (query, positive) pairs, every other pair's positive is a negative
(Oord et al. 2018, "CPC"; Karpukhin et al. 2020, "DPR", sec. 3.2). With unit vectors q_i, p_j
and temperature tau the loss is symmetric (CLIP, Radford et al. 2021):

    loss = (CE(softmax_j(q_i . p_j / tau), i) + CE(softmax_i(q_i . p_j / tau), j)) / 2

Pairs come from JSONL files of ``{"query": ..., "positive": ..., "negative": ...}`` (the
negative optional: a hard negative, e.g. BM25's best wrong answer, which every query of the
batch is also scored against, as DPR's "gold + one BM25 negative" batches) and/or are mined from
documents: a StackExchange question and its first answer, and for other documents the first
paragraph and the rest (the "inverse cloze" idea of Lee et al. 2019, ORQA).

``pilelm finetune RUN --task contrastive --data PAIRS_OR_CORPUS -o OUT`` runs it on the
fine-tuning engine (``pilelm.finetune.loop.ValidatedLoop``), as every fine-tuning task:
the splits of every task (a prepared dir's train/val/test, or ``val_data``/``test_data``, or
``val_ratio``/``test_ratio`` of the pairs), the optimizer (``optim.*``), schedule
(``schedule.*``), precision, LoRA, device, early stopping on the validation MRR@10 and the
checkpoint/resume path. An epoch visits the pairs in a seeded permutation and ends at its last
whole batch (``training/order.py``), so a batch never holds one pair twice.
``pilelm finetune-contrastive`` is the same command with the pair files and the corpus given
apart (``--pairs``, ``--corpus``).

The output is a run directory (stage ``train``: eval, embed, generate and serve read it as any
run) whose tokenizer is the base run's: ``checkpoints/step_N/`` holds the weights with the best
validation MRR@10 (LoRA merged; without validation pairs the newest), ``training/`` the newest
training state a killed run resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pilelm.core.atomic import atomic_write_json
from pilelm.core.manifest import Timer, require_stage, write_manifest
from pilelm.evaluation.retrieval import STACKEXCHANGE, dense_scores, gold_ranks, qa_pair, rank_metrics
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.loop import ValidatedLoop, open_output, record_config
from pilelm.finetune.model import with_dropout
from pilelm.finetune.tasks import split_sources
from pilelm.inference.text_encoder import TextEncoder
from pilelm.models import build_model, spec_for
from pilelm.retrieval.embed import iter_corpus
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.distributed import pick_device
from pilelm.training.optim import build_optimizer
from pilelm.training.precision import resolve_precision

log = logging.getLogger(__name__)

MIN_CHARS = 32  # a mined query or positive shorter than this carries too little to learn from


Pair = tuple[str, str, str | None]  # (query, positive, hard negative or None)


def read_pair_files(paths: list[str]) -> list[Pair]:
    """The (query, positive, negative or None) of every line of JSONL pair files. A line that is
    not such an object, or whose fields are not strings, is an error naming file and line; a
    pair with an empty query or positive is skipped, and the skips are counted in the log."""
    from pilelm.finetune.records import iter_json_records

    pairs: list[Pair] = []
    empty: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"pairs file {path} does not exist")
        for where, rec in iter_json_records(path):
            if "query" not in rec or "positive" not in rec:
                raise ValueError(f"{where}: expected a JSON object with \"query\" and \"positive\" "
                                 f"(and optionally \"negative\"); have {', '.join(rec) or 'no keys'}")
            q, pos, neg = rec["query"], rec["positive"], rec.get("negative")
            for key, value in (("query", q), ("positive", pos), ("negative", neg)):
                if not isinstance(value, str) and not (key == "negative" and value is None):
                    raise ValueError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
            if q.strip() and pos.strip():
                pairs.append((q, pos, neg if neg and neg.strip() else None))
            else:
                empty.append(where)
    if empty:
        log.warning("skipped %d pair(s) with an empty query or positive (the first at %s)", len(empty), empty[0])
    return pairs


def mined_pair(text: str, component: str) -> tuple[str, str] | None:
    """A (query, positive) pair from one document, or None."""
    if component == STACKEXCHANGE:
        return qa_pair(text)
    head, sep, rest = text.strip().partition("\n\n")
    if sep and len(head) >= MIN_CHARS and len(rest.strip()) >= MIN_CHARS:
        return head, rest.strip()
    return None


def mine_pairs(corpus: list[str], splits: list[str]) -> list[Pair]:
    pairs: list[Pair] = []
    for doc in iter_corpus(corpus, splits):
        pair = mined_pair(doc.text, doc.component)
        if pair is not None:
            pairs.append((*pair, None))
    return pairs


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of (B, C) unit vectors whose row i are a pair; ``negatives``
    (N, C) are extra columns of the query -> positive side (hard negatives of the batch)."""
    logits = q @ p.T / temperature  # (B, B)
    labels = torch.arange(len(q), device=q.device)
    positive_side = F.cross_entropy(logits.T, labels)
    if negatives is not None and len(negatives):
        logits = torch.cat([logits, q @ negatives.T / temperature], dim=1)  # (B, B + N)
    return (F.cross_entropy(logits, labels) + positive_side) / 2


def is_pairs_file(path: str | Path) -> bool:
    """A JSONL file whose first record has a ``query`` (else: documents to mine pairs from)."""
    p = Path(path)
    if not p.is_file() or not p.name.endswith(".jsonl"):
        return False
    # -sig: a byte-order mark is not part of the JSON; bad bytes are read_pair_files' error (file:line).
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(record := json.loads(first), dict) and "query" in record
    except json.JSONDecodeError:
        return False


def read_pairs(files: list[Path]) -> list[Pair]:
    """The pairs of ``files``: pair files read as they are, other files' documents mined (a
    prepared dir among other files: its train split)."""
    pairs = read_pair_files([str(f) for f in files if is_pairs_file(f)])
    for f in files:
        if not is_pairs_file(f):
            pairs += mine_pairs([str(f)], ["train"])
    return pairs


@dataclass
class PairSplit:
    """One split's pairs as token ids, cut to the length limit."""

    queries: list[list[int]]
    positives: list[list[int]]
    negatives: list[list[int] | None]
    texts: list[Pair]

    @classmethod
    def encode(cls, pairs: list[Pair], encoder: TextEncoder, limit: int) -> PairSplit:
        def cut(ids: list[int]) -> list[int]:
            return ids[:limit] or [encoder.pad_id]

        queries = [cut(q) for q in encoder.tokenize([q for q, _, _ in pairs])]
        positives = [cut(p) for p in encoder.tokenize([p for _, p, _ in pairs])]
        has_negative = [i for i, (_, _, n) in enumerate(pairs) if n is not None]
        negatives: list[list[int] | None] = [None] * len(pairs)
        for i, ids in zip(has_negative, encoder.tokenize([pairs[i][2] or "" for i in has_negative]), strict=True):
            negatives[i] = cut(ids)
        return cls(queries, positives, negatives, pairs)


def retrieval_metrics(encoder: TextEncoder, pairs: list[Pair], batch_size: int) -> dict[str, float]:
    """MRR@10 and recall@k of each query against every positive of ``pairs`` (eval mode)."""
    encoder.model.eval()
    scores, _ = dense_scores(encoder, [q for q, _, _ in pairs], [p for _, p, _ in pairs], batch_size)
    return rank_metrics(gold_ranks(scores))


class ContrastiveTrainer(ValidatedLoop):
    """In-batch InfoNCE on the fine-tuning engine; validated by MRR@10 on the validation pairs."""

    metric_name = "MRR@10"
    drop_last = True  # a pair twice in one batch would be its own negative
    state_keys = (*ValidatedLoop.state_keys, "losses")

    def __init__(self, cfg: FinetuneConfig, splits: dict[str, list[Pair]]):
        loop = cfg.loop
        self.cfg, self.out = cfg, Path(cfg.output)
        self.state_root = self.out / "training"
        if loop.num_threads:
            torch.set_num_threads(loop.num_threads)
        self.device = pick_device(loop.device)
        trunk, self.model_cfg, tok_dir = ckpt_io.load_for_inference(cfg.run)
        from pilelm.tokens.tokenizer import load_tokenizer

        torch.manual_seed(loop.seed)
        model = build_model(with_dropout(self.model_cfg, cfg.head.dropout))  # head.dropout: the trunk's
        model.load_state_dict(trunk.state_dict())
        del trunk
        family = spec_for(self.model_cfg).family
        if cfg.lora.r:
            from pilelm.finetune.lora import add_lora

            add_lora(model, family, cfg.lora)
        self.precision = resolve_precision(loop.precision, self.device)
        self.model = model.to(self.device)
        self.precision.prepare_model(self.model)
        pooling = "mean" if cfg.head.pooling == "auto" else cfg.head.pooling
        self.encoder = TextEncoder(self.model, self.model_cfg, load_tokenizer(tok_dir), pooling, self.device)
        self.tok_dir = Path(tok_dir)
        limit = min(cfg.max_length, self.encoder.max_tokens)
        self.pairs = splits
        self.train = PairSplit.encode(splits["train"], self.encoder, limit)
        if len(self.train.queries) < 2:
            raise ValueError(f"{len(self.train.queries)} (query, positive) training pairs found; in-batch negatives "
                             "need at least 2")
        self.batch = min(loop.batch_size, len(self.train.queries))
        if self.batch != loop.batch_size:
            self.cfg = cfg = dataclasses.replace(cfg, loop=dataclasses.replace(loop, batch_size=self.batch))
        self.num_items = len(self.train.queries)
        self.item_lengths = np.array([len(q) + len(p) for q, p in zip(self.train.queries, self.train.positives,
                                                                       strict=True)])
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.model, cfg.optim), self.model)
        self.losses: list[float] = []
        self.init_progress()

    def has_validation(self) -> bool:
        return bool(self.pairs.get("val"))

    def batch_loss(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        t, enc = self.train, self.encoder
        hard = [n for i in idx if (n := t.negatives[i]) is not None]
        with self.precision.autocast():
            loss = info_nce(enc.forward_pooled([t.queries[i] for i in idx]),
                            enc.forward_pooled([t.positives[i] for i in idx]), self.cfg.contrastive.temperature,
                            enc.forward_pooled(hard) if hard else None)
        return loss, len(idx)

    def train_step(self) -> float:
        loss = super().train_step()
        self.losses.append(loss)
        return loss

    def evaluate(self, split: str) -> dict[str, float]:
        return retrieval_metrics(self.encoder, self.pairs[split], self.cfg.loop.eval_batch_size)

    def validation_metric(self) -> tuple[float, dict[str, Any]]:
        result = self.evaluate("val")
        return result["mrr@10"], {f"val_{k}": v for k, v in result.items()}

    def save_best(self) -> None:
        d = ckpt_io.checkpoint_dir(self.out, self.step)
        ckpt_io.save_weights(d, self.weights(), self.model_cfg)
        ckpt_io.finalize_checkpoint(d)
        ckpt_io.prune_checkpoints(self.out, keep_last=1)

    def save_weights_to(self, d: Path) -> None:
        ckpt_io.save_weights(d, self.precision.model_state(self.model), self.model_cfg)


def run_contrastive_task(cfg: FinetuneConfig) -> Path:
    """``pilelm finetune --task contrastive``: pairs files and/or documents to mine in ``data``
    (or a prepared dir: its train/val/test splits), trained on the fine-tuning engine."""
    from pilelm.tokens.tokenizer import copy_tokenizer

    if not cfg.run or not cfg.output or not cfg.data:
        raise ValueError("contrastive fine-tuning needs a run, pairs and/or a corpus, and an output: "
                         "pilelm finetune RUN_DIR --task contrastive --data PAIRS.jsonl|PREPARED_DIR -o RUN_DIR")
    require_stage(cfg.run, "train", "import", what="run")
    timer = Timer()
    with timer("pairs"):
        splits = split_sources(cfg, read_pairs, require_val=False)
    trainer = ContrastiveTrainer(cfg, splits)
    out = trainer.out
    resuming = open_output(out, trainer.state_root, cfg)
    record_config(out, cfg, resuming)
    if not (out / "tokenizer").is_dir():
        copy_tokenizer(trainer.tok_dir, out / "tokenizer")
    with timer("train"):
        trainer.fit("finetune contrastive")
    if trainer.preempted:
        return out
    best, _ = ckpt_io.load_model(ckpt_io.resolve_checkpoint(out)[1], trainer.device)
    trainer.encoder.model = best
    results: dict[str, Any] = {"task": "contrastive", "metric": trainer.metric_name, "best_step": trainer.best_step,
                               "steps": trainer.step, "lora_r": cfg.lora.r}
    if trainer.has_validation():
        results["best_val"] = trainer.best
    for split in ("val", "test"):
        if splits.get(split):
            results[split] = trainer.evaluate(split)
    atomic_write_json(out / "results.json", results)
    losses = trainer.losses
    from pilelm.finetune.lora import trainable_parameters

    trainable, total = trainable_parameters(trainer.model)
    counts = {f"{s}_pairs": len(p) for s, p in splits.items()} | {
        "pairs": len(splits["train"]), "hard_negatives": sum(n is not None for _, _, n in splits["train"]),
        "steps": trainer.step, "best_step": trainer.best_step, "trainable_parameters": trainable,
        "parameters": total, "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-10:])) if losses else None}
    write_manifest(out, "train", cfg, inputs=[cfg.run, *cfg.data, *cfg.val_data, *cfg.test_data], counts=counts,
                   timings=timer.timings, extra={"objective": "contrastive", "task": "contrastive",
                                                 "base_run": cfg.run,
                                                 "test_mrr@10": results.get("test", {}).get("mrr@10")})
    return out


@dataclass
class ContrastiveConfig(FinetuneConfig):
    """``pilelm finetune-contrastive``: ``pilelm finetune --task contrastive`` with the pair
    files and the corpus to mine given apart; every other key is ``finetune``'s."""

    RENAMED: ClassVar[dict[str, str]] = {
        "steps": "loop.max_steps", "lr": "optim.lr", "batch_size": "loop.batch_size",
        "warmup_steps": "schedule.warmup_steps", "weight_decay": "optim.weight_decay",
        "temperature": "contrastive.temperature", "max_tokens": "max_length", "max_pairs": "max_train_examples",
        "save_every": "loop.eval_every", "seed": "loop.seed", "device": "loop.device", "pooling": "head.pooling",
        "splits": "data=PREPARED_DIR (its train split trains, val validates, test tests, as every finetune task)",
    }
    """The old finetune-contrastive keys and the finetune keys that replaced them."""

    task: str = "contrastive"
    """Always contrastive here."""
    pairs: list[str] = field(default_factory=list)
    """JSONL files of {"query": ..., "positive": ..., "negative": ...} pairs (added to data)."""
    corpus: list[str] = field(default_factory=list)
    """A prepared dir or document files to mine pairs from (StackExchange question -> answer; first paragraph -> rest; added to data)."""

    def __post_init__(self) -> None:
        if self.task != "contrastive":
            raise ValueError(f"finetune-contrastive trains task contrastive, not {self.task!r}; use pilelm finetune")
        super().__post_init__()

    def as_finetune(self) -> FinetuneConfig:
        keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**keys | {"data": [*self.pairs, *self.corpus, *self.data]})


def run_contrastive(cfg: ContrastiveConfig) -> Path:
    """``pilelm finetune-contrastive``."""
    return run_contrastive_task(cfg.as_finetune())
