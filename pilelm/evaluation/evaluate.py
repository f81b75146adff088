"""``pilelm eval``: bits per byte and perplexity per Pile component; BLEU / chrF.

The Pile paper's protocol (Gao et al. 2020, sec. 4): every document is scored on its own, and
a document longer than the model's context is scored with a sliding window. Here a document
of n tokens is read as ``[EOD] + tokens``: the end-of-document token is the context of the
first token, as it is in training, where documents follow each other's EOD. A window holds
up to ``context`` inputs; the first scores all its predictions, each later one moves ``stride``
tokens on and scores only its last ``stride`` predictions, so every token after the first
window sees at least ``context - stride`` tokens of its document. (stride = context: disjoint
windows, cheapest; stride = 1: full context for every token, the most expensive.)

    bits per byte = sum of token NLLs (nats) / ln 2 / UTF-8 bytes of the documents' text
    token perplexity = exp(sum NLL / scored tokens)

BPB does not depend on the tokenizer, so runs with different tokenizers compare fairly. The
final EOD is not scored (it has no bytes), as in lm-evaluation-harness's rolling loglikelihood.

The unigram baseline scores the same documents with token frequencies of the train split
(add-one smoothing; the first run's tokenizer when the runs' tokenizers differ): a floor every
trained model must beat by a wide margin.

Input: a shard dir (``pilelm tokenize`` output; its tokenizer must be the run's) or a prepared
dir (``pilelm prepare`` output; each run's tokenizer encodes the text). Output (``-o EVAL``):
``results.json``, ``results.md``, ``bpb.png``, ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pilelm.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from pilelm.core.manifest import Timer, require_stage, write_manifest
from pilelm.data.prepared import SPLITS, split_files
from pilelm.models.dtypes import DTYPES
from pilelm.models.gpt import GPTConfig
from pilelm.training.checkpoint import (
    list_checkpoints,
    load_for_inference,
    resolve_checkpoint,
    split_checkpoint_path,
)

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


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
    device: str = "cpu"
    """Torch device."""
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

    def __post_init__(self) -> None:
        for key in ("context", "stride", "max_documents", "batch_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.bleu_max_new_tokens < 1 or self.bleu_num_beams < 1 or self.bleu_batch_size < 1:
            raise ValueError("bleu_max_new_tokens, bleu_num_beams and bleu_batch_size must be >= 1")
        if self.split not in SPLITS:
            raise ValueError(f"split must be train, val or test, got {self.split!r}")


# ---------------------------------------------------------------------------------------------
# Scoring


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / LN2 / n_bytes if n_bytes else float("nan")


def summarize(nll: float, tokens: int, n_bytes: int, documents: int) -> dict[str, float | int]:
    """The metrics of a set of documents from their summed NLL (nats), tokens and bytes."""
    return {
        "bpb": bits_per_byte(nll, n_bytes),
        "ppl_token": math.exp(nll / tokens) if tokens else float("nan"),
        "nll": nll / tokens if tokens else float("nan"),  # nats per token, the training loss
        "tokens": int(tokens),
        "bytes": int(n_bytes),
        "documents": int(documents),
    }


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over the n predictions of a document read as [EOD] + n tokens.

    Prediction j reads inputs x[0..j] and predicts x[j+1]. Returns (a, b, s): a window feeds
    inputs x[a:b] and scores predictions j in [s, b); the windows' scored ranges tile [0, n).
    """
    if n <= 0:
        return []
    b = min(context, n)
    out = [(0, b, 0)]
    while b < n:
        nb = min(b + stride, n)
        out.append((max(0, nb - context), nb, b))
        b = nb
    return out


@dataclass
class DocumentSet:
    """Documents to score, tokenized by one tokenizer."""

    tokens: list[np.ndarray]
    """Each document's tokens, without the EOD."""
    component: np.ndarray
    """Component code per document."""
    component_names: list[str]
    nbytes: np.ndarray
    """UTF-8 bytes of each document's text."""
    eod_id: int
    vocab_size: int
    """Size of the tokenizer's vocabulary (the unigram baseline's support)."""


def _auto_batch_tokens(context: int, vocab: int) -> int:
    # ~64M float32 logits (256 MB) per forward, at least one full window, at most 16 windows.
    return max(context, min(16 * context, (1 << 26) // max(vocab, 1)))


@torch.inference_mode()
def score_documents(
    model: nn.Module,
    docs: DocumentSet,
    context: int,
    stride: int,
    batch_tokens: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of NLL (nats, float64) and number of scored tokens of every document.

    Windows of all documents are sorted by length and packed into batches of about
    ``batch_tokens`` (right-padded: causal attention keeps padding out of real positions).
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    batch_tokens = batch_tokens or _auto_batch_tokens(context, model.cfg.vocab_size)
    windows = []  # (length, doc, a, b, s)
    for d, toks in enumerate(docs.tokens):
        for a, b, s in sliding_windows(len(toks), context, stride):
            windows.append((b - a, d, a, b, s))
    windows.sort(key=lambda w: -w[0])
    nll = np.zeros(len(docs.tokens), dtype=np.float64)
    counts = np.zeros(len(docs.tokens), dtype=np.int64)
    i = 0
    with tqdm(total=len(windows), desc=desc, unit="win", disable=None, leave=False) as bar:
        while i < len(windows):
            width = windows[i][0]
            batch = windows[i : i + max(1, batch_tokens // width)]
            i += len(batch)
            inputs = np.zeros((len(batch), width), dtype=np.int64)
            targets = np.full((len(batch), width), -100, dtype=np.int64)
            for r, (length, d, a, b, s) in enumerate(batch):
                toks = docs.tokens[d]  # x = [EOD] + toks, so x[i] = toks[i - 1]
                if a == 0:
                    inputs[r, 0] = docs.eod_id
                    inputs[r, 1:length] = toks[: b - 1]
                else:
                    inputs[r, :length] = toks[a - 1 : b - 1]
                targets[r, s - a : length] = toks[s:b]
            inp = torch.from_numpy(inputs).to(device)
            tgt = torch.from_numpy(targets).to(device)
            logits, _ = model(inp)
            token_nll = F.cross_entropy(
                logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none"
            ).view(len(batch), width)
            row_nll = token_nll.double().sum(dim=1).cpu().numpy()
            row_count = (tgt != -100).sum(dim=1).cpu().numpy()
            for r, (_, d, *_rest) in enumerate(batch):
                nll[d] += row_nll[r]
                counts[d] += row_count[r]
            bar.update(len(batch))
    return nll, counts


def unigram_logprobs(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) with add-one (Laplace) smoothing over the tokenizer's vocabulary."""
    counts = counts[:vocab_size].astype(np.float64)
    if len(counts) < vocab_size:
        counts = np.pad(counts, (0, vocab_size - len(counts)))
    return np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)


def score_unigram(logp: np.ndarray, docs: DocumentSet) -> tuple[np.ndarray, np.ndarray]:
    nll = np.array([-logp[t].sum() for t in docs.tokens], dtype=np.float64)
    return nll, np.array([len(t) for t in docs.tokens], dtype=np.int64)


def aggregate(nll: np.ndarray, counts: np.ndarray, docs: DocumentSet) -> dict[str, Any]:
    """{"overall": metrics, "components": {name: metrics}} of per-document sums."""
    out: dict[str, Any] = {
        "overall": summarize(float(nll.sum()), int(counts.sum()), int(docs.nbytes.sum()), len(nll)),
        "components": {},
    }
    for code in sorted(set(docs.component.tolist()), key=lambda c: docs.component_names[c]):
        m = docs.component == code
        out["components"][docs.component_names[code]] = summarize(
            float(nll[m].sum()), int(counts[m].sum()), int(docs.nbytes[m].sum()), int(m.sum())
        )
    return out


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class EvalData:
    """The documents of one split, in whichever form the input directory holds them."""

    path: Path
    stage: str  # "tokenize" or "prepare"
    split: str
    max_documents: int
    _cache: dict[str, DocumentSet] = field(default_factory=dict)

    def documents(self, tokenizer_dir: Path) -> DocumentSet:
        """The split's documents as the tokenizer in ``tokenizer_dir`` encodes them."""
        from pilelm.tokens.identity import fingerprint_of

        key = fingerprint_of(tokenizer_dir)
        if key not in self._cache:
            shards = self.stage == "tokenize"
            self._cache[key] = self._shard_docs(tokenizer_dir) if shards else self._prepared_docs(tokenizer_dir)
        return self._cache[key]

    def _shard_docs(self, tokenizer_dir: Path) -> DocumentSet:
        from pilelm.tokens.identity import require_same_tokenizer
        from pilelm.tokens.shards import open_split

        require_same_tokenizer(tokenizer_dir, self.path, what="eval",
                               fix="pass the prepared dir (pilelm prepare output) as --data to encode the text "
                                   "with each run's tokenizer")
        ts = open_split(self.path, self.split)
        n = len(ts.dataset) if not self.max_documents else min(self.max_documents, len(ts.dataset))
        tokens = [np.asarray(ts.dataset[i][:-1]) for i in range(n)]  # drop the appended EOD
        return DocumentSet(tokens, np.asarray(ts.component[:n]), list(ts.component_names),
                           np.asarray(ts.nbytes[:n], dtype=np.int64), int(ts.eod_id), int(ts.vocab_size))

    def _prepared_docs(self, tokenizer_dir: Path) -> DocumentSet:
        from pilelm.tokens.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        if tok.eod_id is None:
            raise ValueError(f"tokenizer {tokenizer_dir} has no end-of-document token")
        texts, comps = [], []
        for text, component in _read_prepared(self.path, self.split, self.max_documents):
            texts.append(text)
            comps.append(component)
        names = sorted(set(comps))
        code = {n: i for i, n in enumerate(names)}
        tokens = []
        for start in range(0, len(texts), 256):
            tokens += [np.asarray(t, dtype=np.int64) for t in tok.encode_batch(texts[start : start + 256])]
        nbytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
        return DocumentSet(tokens, np.array([code[c] for c in comps], dtype=np.int16), names, nbytes,
                           int(tok.eod_id), int(tok.vocab_size))

    def train_token_counts(self, tokenizer_dir: Path, vocab_size: int) -> np.ndarray | None:
        """Token frequencies of the train split (without EOD), or None if there is none."""
        if self.stage == "tokenize":
            from pilelm.tokens.shards import open_split

            if not (self.path / "train.idx").is_file():
                return None
            ts = open_split(self.path, "train")
            counts = np.zeros(max(vocab_size, int(ts.vocab_size)), dtype=np.int64)
            flat = ts.dataset.tokens
            for start in range(0, len(flat), 1 << 24):
                counts += np.bincount(np.asarray(flat[start : start + (1 << 24)]), minlength=len(counts))[: len(counts)]
            counts[ts.eod_id] -= len(ts.dataset)  # one EOD per document, never scored
            return counts
        from pilelm.tokens.tokenizer import load_tokenizer

        if not split_files(self.path, "train"):
            return None
        tok = load_tokenizer(tokenizer_dir)
        counts = np.zeros(vocab_size, dtype=np.int64)
        batch: list[str] = []
        for text, _ in _read_prepared(self.path, "train", 0):
            batch.append(text)
            if len(batch) == 256:
                counts += _bincount(tok.encode_batch(batch), vocab_size)
                batch = []
        if batch:
            counts += _bincount(tok.encode_batch(batch), vocab_size)
        return counts


def _bincount(seqs: list[list[int]], size: int) -> np.ndarray:
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    return np.bincount(flat, minlength=size)[:size]


def _read_prepared(prep: Path, split: str, limit: int) -> Iterator[tuple[str, str]]:
    """(text, component) of a prepared split's documents in canonical order."""
    from pilelm.data.prepared import read_split

    for doc in read_split(prep, split, limit):
        yield doc.text, doc.component or "unknown"


def open_eval_data(path: str | Path, split: str, max_documents: int) -> EvalData:
    path = Path(path)
    manifest = require_stage(path, "tokenize", "prepare", what="eval data")
    stage = manifest["stage"]
    if stage == "tokenize" and not (path / f"{split}.idx").is_file():
        have = sorted(p.stem for p in path.glob("*.idx"))
        raise FileNotFoundError(f"{path} has no {split} split ({split}.bin/.idx); splits here: {have}")
    return EvalData(path, stage, split, max_documents)


@dataclass
class RunSpec:
    name: str
    run_dir: Path
    step: int


def resolve_runs(specs: list[str], all_checkpoints: bool) -> list[RunSpec]:
    """Run dirs or checkpoint dirs -> (display name, run dir, step) with unique names."""
    out: list[RunSpec] = []
    for spec in specs:
        path, step = split_checkpoint_path(spec)
        require_stage(path, "train", "import", what="run")
        if step is not None:
            out.append(RunSpec(f"{path.name}@{step}", path, step))
            continue
        newest, _ = resolve_checkpoint(path)  # raises when the run has no usable checkpoint
        if all_checkpoints:
            out += [RunSpec(f"{path.name}@{step}", path, step) for step, _ in list_checkpoints(path)]
        else:
            out.append(RunSpec(path.name, path, newest))
    names = [r.name for r in out]
    for r in out:
        if names.count(r.name) > 1:
            r.name = f"{r.run_dir.parent.name}/{r.name}"
    if len({r.name for r in out}) < len(out):
        raise ValueError(f"the runs to compare must differ; got {specs}")
    return out


# ---------------------------------------------------------------------------------------------
# BLEU / chrF


def read_pairs(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Prompts and reference lists of a JSONL file of {"prompt", "reference"} records."""
    prompts, refs = [], []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bleu_data {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            ref = rec.get("reference", rec.get("references")) if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or ref is None:
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str, "reference": str or [str]}}')
            ref_list = [ref] if isinstance(ref, str) else list(ref)
            if not ref_list or not all(isinstance(r, str) for r in ref_list):
                raise ValueError(f"{path}:{lineno}: reference must be a string or a non-empty list of strings")
            prompts.append(rec["prompt"])
            refs.append(ref_list)
    if not prompts:
        raise ValueError(f"{path}: no prompt/reference pairs")
    return prompts, refs


def bleu_chrf(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, chrF2) of the hypotheses."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference streams; None fills a missing reference of a segment.
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(n_refs)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams)
    chrf = sacrebleu.corpus_chrf(hypotheses, streams)
    return {"bleu": bleu.score, "chrf": chrf.score, "pairs": len(hypotheses), "bleu_signature": str(bleu.format())}


def run_bleu(model: nn.Module, tokenizer_dir: Path, cfg: EvalConfig) -> dict[str, Any]:
    from pilelm.inference.generate import SamplingParams, generate, unescape
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    prompts, refs = read_pairs(cfg.bleu_data)
    stop = [unescape(s) for s in cfg.bleu_stop]
    params = SamplingParams(max_new_tokens=cfg.bleu_max_new_tokens, temperature=0.0, stop=stop)
    hyps: list[str] = []
    for start in tqdm(range(0, len(prompts), cfg.bleu_batch_size), desc="bleu", disable=None, leave=False):
        hyps += generate(model, tok, prompts[start : start + cfg.bleu_batch_size], params, cfg.bleu_num_beams)
    return bleu_chrf([h.strip() for h in hyps], refs)


# ---------------------------------------------------------------------------------------------
# Report


def results_markdown(results: dict[str, Any], settings: dict[str, Any]) -> str:
    runs = results["runs"]
    cols = list(runs) + list(results["baselines"])
    ref = next(iter(runs.values()), None) or next(iter(results["baselines"].values()), None)
    lines = [f"# Evaluation of {', '.join(runs)}", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    lines.append("")
    if ref is not None and "overall" in ref:
        comps = list(ref["components"])

        def row(label: str, key: str, get) -> str:
            cells = []
            for c in cols:
                entry = runs.get(c) or results["baselines"].get(c)
                m = get(entry)
                cells.append(f"{m[key]:.4f}" if m else "")
            return f"| {label} | " + " | ".join(cells) + " |"

        for title, key in (("Bits per byte (lower is better)", "bpb"), ("Token perplexity", "ppl_token")):
            lines += [f"## {title}", "", "| component | " + " | ".join(cols) + " |",
                      "|---|" + "---:|" * len(cols)]
            for comp in comps:
                lines.append(row(comp, key, lambda e, comp=comp: e["components"].get(comp)))
            lines.append(row("**overall**", key, lambda e: e["overall"]))
            lines.append("")
        lines += ["## Documents", "", "| component | documents | bytes | tokens |", "|---|---:|---:|---:|"]
        for comp, m in ref["components"].items():
            lines.append(f"| {comp} | {m['documents']} | {m['bytes']} | {m['tokens']} |")
        o = ref["overall"]
        lines += [f"| **overall** | {o['documents']} | {o['bytes']} | {o['tokens']} |", ""]
    gen = {name: r["generation"] for name, r in runs.items() if "generation" in r}
    if gen:
        lines += ["## Conditional generation", "", "| run | BLEU | chrF | pairs |", "|---|---:|---:|---:|"]
        for name, g in gen.items():
            lines.append(f"| {name} | {g['bleu']:.2f} | {g['chrf']:.2f} | {g['pairs']} |")
        lines += ["", f"sacrebleu: `{next(iter(gen.values()))['bleu_signature']}`", ""]
    return "\n".join(lines)


def plot_bpb(results: dict[str, Any], path: Path) -> None:
    """Grouped horizontal bars: BPB per component (and overall), one bar per run/baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = {**results["runs"], **{f"{k} (baseline)": v for k, v in results["baselines"].items()}}
    entries = {k: v for k, v in entries.items() if "overall" in v}
    if not entries:
        return
    comps = sorted({c for v in entries.values() for c in v["components"]}) + ["overall"]
    n = len(entries)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.35 * len(comps) * max(1, n / 2)))
    for k, (name, v) in enumerate(entries.items()):
        vals = [v["overall"]["bpb"] if c == "overall" else v["components"].get(c, {}).get("bpb", np.nan) for c in comps]
        ax.barh(np.arange(len(comps)) + k * height, vals, height=height, label=name)
    ax.set_yticks(np.arange(len(comps)) + height * (n - 1) / 2, comps)
    ax.invert_yaxis()
    ax.set_xlabel("bits per byte (lower is better)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Stage


def run_eval(cfg: EvalConfig) -> Path:
    if not cfg.runs:
        raise ValueError("eval needs at least one run: pilelm eval RUN_DIR... --data DATA_DIR -o EVAL_DIR")
    if not cfg.output:
        raise ValueError("eval needs an output folder: -o EVAL_DIR")
    if not cfg.data and not cfg.bleu_data:
        raise ValueError("eval needs --data (shard or prepared dir) and/or --bleu-data (prompt/reference JSONL)")
    out = Path(cfg.output)
    timer = Timer()
    runs = resolve_runs(cfg.runs, cfg.all_checkpoints)
    data = open_eval_data(cfg.data, cfg.split, cfg.max_documents) if cfg.data else None
    results: dict[str, Any] = {"runs": {}, "baselines": {}}
    settings: dict[str, Any] = {"data": cfg.data, "split": cfg.split}
    first_docs: DocumentSet | None = None
    first_tok: Path | None = None
    for spec in runs:
        model, model_cfg, tok_dir = load_for_inference(spec.run_dir, spec.step, cfg.device)
        if not isinstance(model_cfg, GPTConfig):
            raise ValueError(f"run {spec.run_dir} holds a {type(model_cfg).__name__} model; eval scores causal LMs")
        model = model.to(DTYPES[cfg.dtype])
        entry: dict[str, Any] = {"run": str(spec.run_dir), "step": spec.step}
        if data is not None:
            context = cfg.context or model_cfg.block_size
            if context > model_cfg.block_size:
                raise ValueError(f"context {context} exceeds the context of {spec.name} ({model_cfg.block_size})")
            stride = cfg.stride or max(1, context // 2)
            if stride > context:
                raise ValueError(f"stride ({stride}) must not exceed the window ({context})")
            with timer("tokenize"):
                docs = data.documents(tok_dir)
            if first_docs is None:
                first_docs, first_tok = docs, tok_dir
            with timer(f"score {spec.name}"):
                nll, counts = score_documents(model, docs, context, stride, cfg.batch_tokens, cfg.device, spec.name)
            entry.update(aggregate(nll, counts, docs))
            entry.update({"context": context, "stride": stride})
            log.info("%s: %.4f bits per byte over %d documents", spec.name, entry["overall"]["bpb"], len(docs.tokens))
        if cfg.bleu_data:
            with timer(f"bleu {spec.name}"):
                entry["generation"] = run_bleu(model, tok_dir, cfg)
            log.info("%s: BLEU %.2f chrF %.2f", spec.name, entry["generation"]["bleu"], entry["generation"]["chrf"])
        results["runs"][spec.name] = entry
        del model
    if data is not None and cfg.unigram and first_docs is not None and first_tok is not None:
        with timer("unigram"):
            counts = data.train_token_counts(first_tok, first_docs.vocab_size)
        if counts is None:
            log.warning("%s has no train split: no unigram baseline", cfg.data)
        else:
            logp = unigram_logprobs(counts, first_docs.vocab_size)
            results["baselines"]["unigram"] = aggregate(*score_unigram(logp, first_docs), first_docs)
    if first_docs is not None:
        settings.update(documents=len(first_docs.tokens), context=cfg.context or "model", stride=cfg.stride or "context/2")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results, settings))
    plot_bpb(results, out / "bpb.png")
    inputs = list(dict.fromkeys([r.run_dir for r in runs]))
    inputs += [Path(p) for p in (cfg.data, cfg.bleu_data) if p]
    counts = {"runs": len(runs), "documents": len(first_docs.tokens) if first_docs is not None else 0}
    write_manifest(out, "eval", cfg, inputs=inputs, counts=counts, timings=timer.timings, extra={"settings": settings})
    return out
