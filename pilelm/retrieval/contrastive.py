"""Contrastive fine-tuning: make pooled states retrieve, with in-batch negatives (InfoNCE).

For a batch of (query, positive) pairs, every other pair's positive is a negative
(Oord et al. 2018, "CPC"; Karpukhin et al. 2020, "DPR", sec. 3.2). With unit vectors q_i, p_j
and temperature tau the loss is symmetric (CLIP, Radford et al. 2021):

    loss = (CE(softmax_j(q_i . p_j / tau), i) + CE(softmax_i(q_i . p_j / tau), j)) / 2

Pairs come from JSONL files of ``{"query": ..., "positive": ..., "negative": ...}`` (the
negative optional: a hard negative, e.g. BM25's best wrong answer, which every query of the
batch is also scored against, as DPR's "gold + one BM25 negative" batches) and/or are mined from a
corpus: a StackExchange question and its first answer, and for other documents the first
paragraph and the rest (the "inverse cloze" idea of Lee et al. 2019, ORQA). Each epoch visits
the pairs in a seeded permutation, so a batch never holds one pair twice.

``pilelm finetune RUN --task contrastive --data PAIRS_OR_CORPUS -o OUT`` runs the same training
from the fine-tuning config (``run_contrastive_task``); ``pilelm finetune-contrastive`` is the
same command with its own flags (--pairs, --corpus, --splits, --temperature, ...).

The output is a run directory (stage ``train``: eval, embed, generate and serve read it as any
run) whose tokenizer is the base run's; a checkpoint every ``save_every`` steps holds the
optimizer state, so a killed fine-tune resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pilelm.core.config import require_at_least, to_dict
from pilelm.core.manifest import Timer, clear_manifest, write_manifest
from pilelm.evaluation.retrieval import STACKEXCHANGE, qa_pair
from pilelm.inference.text_encoder import TextEncoder
from pilelm.models import model_spec
from pilelm.retrieval.embed import iter_corpus
from pilelm.training import checkpoint

if TYPE_CHECKING:
    from pilelm.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)

MIN_CHARS = 32  # a mined query or positive shorter than this carries too little to learn from


@dataclass
class ContrastiveConfig:
    run: str = ""
    """Run to fine-tune (pilelm train / import output)."""
    pairs: list[str] = field(default_factory=list)
    """JSONL files of {"query": ..., "positive": ...} pairs."""
    corpus: list[str] = field(default_factory=list)
    """A prepared dir or document files to mine pairs from (StackExchange question -> answer; first paragraph -> rest)."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits of a prepared corpus to mine (keep test out: eval --task retrieval reads it)."""
    output: str = ""
    """Run directory to write (-o)."""
    pooling: Literal["mean", "last", "cls"] = "mean"
    """Pooling trained (embed, search and eval must use the same)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Pairs per batch (each pair's positive is a negative for the others)."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear warm-up over warmup_steps, then cosine decay to 10 %)."""
    warmup_steps: int = 10
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    temperature: float = 0.05
    """Softmax temperature of the InfoNCE logits."""
    max_tokens: int = 128
    """Query and positive are cut to this many tokens (and to the model's context)."""
    max_pairs: int = 0
    """Use at most this many pairs (0 = all)."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seed of the pair order."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("steps", "batch_size", "max_tokens", "save_every"))
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be > 0")
        if self.warmup_steps < 0 or self.max_pairs < 0:
            raise ValueError("warmup_steps and max_pairs must be >= 0")


Pair = tuple[str, str, str | None]  # (query, positive, hard negative or None)


def read_pair_files(paths: list[str]) -> list[Pair]:
    pairs: list[Pair] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"pairs file {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                q, pos, neg = rec["query"], rec["positive"], rec.get("negative")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with \"query\" and \"positive\" "
                                 f"(and optionally \"negative\") ({e})") from e
            if neg is not None and not isinstance(neg, str):
                raise ValueError(f"{path}:{n}: \"negative\" must be a string, got {type(neg).__name__}")
            if isinstance(q, str) and isinstance(pos, str) and q.strip() and pos.strip():
                pairs.append((q, pos, neg if neg and neg.strip() else None))
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


def lr_at(step: int, cfg: ContrastiveConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_order(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The pair indices of a step: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch : (i + 1) * batch].tolist()


def _save(out: Path, step: int, encoder: TextEncoder, opt: torch.optim.Optimizer, losses: list[float]) -> None:
    ckpt = out / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(step)
    checkpoint.save_model(ckpt, encoder.model, encoder.model_cfg)
    checkpoint.save_torch(ckpt / checkpoint.TRAIN_STATE, {"step": step, "optimizer": opt.state_dict(),
                                                           "losses": losses})
    checkpoint.finalize_checkpoint(ckpt)
    checkpoint.prune_checkpoints(out, keep_last=1)


def is_pairs_file(path: str | Path) -> bool:
    """A JSONL file whose first record has a ``query`` (else: documents to mine pairs from)."""
    p = Path(path)
    if not p.is_file() or not p.name.endswith(".jsonl"):
        return False
    with open(p, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(record := json.loads(first), dict) and "query" in record
    except json.JSONDecodeError:
        return False


def run_contrastive_task(cfg: FinetuneConfig) -> Path:
    """``pilelm finetune --task contrastive``: the fine-tuning config mapped onto
    ``ContrastiveConfig`` (data: pair files and/or documents to mine; max_length -> max_tokens;
    loop.max_steps, batch_size, seed, eval_every -> save_every; optim.lr and weight_decay;
    schedule.warmup_steps; max_train_examples -> max_pairs; head.pooling, auto = mean)."""
    pairs = [d for d in cfg.data if is_pairs_file(d)]
    return run_contrastive(ContrastiveConfig(
        run=cfg.run, pairs=pairs, corpus=[d for d in cfg.data if d not in pairs], output=cfg.output,
        pooling="mean" if cfg.head.pooling == "auto" else cfg.head.pooling, steps=cfg.loop.max_steps,
        batch_size=cfg.loop.batch_size, lr=cfg.optim.lr, warmup_steps=cfg.schedule.warmup_steps,
        weight_decay=cfg.optim.weight_decay, temperature=cfg.contrastive.temperature, max_tokens=cfg.max_length,
        max_pairs=cfg.max_train_examples, save_every=cfg.loop.eval_every, seed=cfg.loop.seed,
        device="cpu" if cfg.loop.device == "auto" else cfg.loop.device))


CONFIG_FILE = "config.yaml"
RESUME_NEUTRAL = frozenset({"output", "steps", "save_every", "device"})
"""Keys a resumed contrastive fine-tune may change: how long, how often it saves, where it runs."""


def record_config(out: Path, cfg: ContrastiveConfig, resuming: bool) -> None:
    """Write ``out/config.yaml``, first refusing to resume a run started with another config (as
    ``pilelm train`` and ``pilelm finetune`` refuse): the resumed run must equal an
    uninterrupted one, so every key that shapes the weights must be the same."""
    from pilelm.core.atomic import atomic_write_text
    from pilelm.core.config import dump_yaml
    from pilelm.training.resume import refuse_resume, saved_config_differences

    saved = out / CONFIG_FILE
    if resuming:
        refuse_resume(out, "a contrastive fine-tune started with another config",
                      saved_config_differences(saved, cfg, RESUME_NEUTRAL),
                      f"Give a new -o, or delete {out} to train anew there")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, dump_yaml(cfg))


def run_contrastive(cfg: ContrastiveConfig) -> Path:
    from pilelm.tokens.tokenizer import copy_tokenizer

    if not cfg.run or not cfg.output or not (cfg.pairs or cfg.corpus):
        raise ValueError("finetune-contrastive needs a run, pairs and/or a corpus, and an output: "
                         "pilelm finetune-contrastive RUN_DIR --corpus PREPARED_DIR -o RUN_DIR")
    out = Path(cfg.output)
    timer = Timer()
    with timer("pairs"):
        pairs = read_pair_files(cfg.pairs) + (mine_pairs(cfg.corpus, cfg.splits) if cfg.corpus else [])
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} (query, positive) pairs found; in-batch negatives need at least 2")
    encoder = TextEncoder.from_run(cfg.run, pooling=cfg.pooling, device=cfg.device)
    limit = min(cfg.max_tokens, encoder.max_tokens)
    queries = [q[:limit] or [encoder.pad_id] for q in encoder.tokenize([q for q, _, _ in pairs])]
    positives = [p[:limit] or [encoder.pad_id] for p in encoder.tokenize([p for _, p, _ in pairs])]
    has_negative = [i for i, (_, _, n) in enumerate(pairs) if n is not None]
    negative_ids = encoder.tokenize([pairs[i][2] or "" for i in has_negative])
    negatives: list[list[int] | None] = [None] * len(pairs)
    for i, ids in zip(has_negative, negative_ids, strict=True):
        negatives[i] = ids[:limit] or [encoder.pad_id]
    model = encoder.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    resumable = checkpoint.find_resumable(out) if out.is_dir() else None
    record_config(out, cfg, resuming=resumable is not None)
    clear_manifest(out)  # training (on): the dir is unfinished until the new manifest lands
    if resumable is not None:
        step, ckpt = resumable
        model.load_state_dict(checkpoint.load_model(ckpt, cfg.device)[0].state_dict())
        state = checkpoint.load_torch(ckpt / checkpoint.TRAIN_STATE)
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
        log.info("resuming from step %d", start)
    batch = min(cfg.batch_size, len(pairs))
    bar = tqdm(range(start, cfg.steps), desc="contrastive", unit="step", initial=start, total=cfg.steps, disable=None)
    with timer("train"):
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            idx = batch_order(len(pairs), batch, step, cfg.seed)
            hard = [n for i in idx if (n := negatives[i]) is not None]
            loss = info_nce(encoder.forward_pooled([queries[i] for i in idx]),
                            encoder.forward_pooled([positives[i] for i in idx]), cfg.temperature,
                            encoder.forward_pooled(hard) if hard else None)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower lr or raise temperature")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save(out, step + 1, encoder, opt, losses)
    bar.close()
    copy_tokenizer(Path(cfg.run) / "tokenizer", out / "tokenizer")
    counts = {"pairs": len(pairs), "hard_negatives": len(has_negative), "steps": cfg.steps,
              "first_loss": losses[0] if losses else None,
              "final_loss": float(np.mean(losses[-10:])) if losses else None}
    config = {"contrastive": to_dict(cfg), "model": model_spec(encoder.model_cfg)["config"]}
    write_manifest(out, "train", config, inputs=[cfg.run, *cfg.pairs, *cfg.corpus], counts=counts,
                   timings=timer.timings, extra={"objective": "contrastive", "base_run": cfg.run})
    return out
