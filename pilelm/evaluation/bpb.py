"""Bits per byte and perplexity per Pile component, and the unigram baseline.

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
(add-one smoothing): a floor every trained model must beat by a wide margin.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pilelm.evaluation.documents import DocumentSet

LN2 = math.log(2.0)


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
