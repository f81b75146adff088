"""How much a causal LM memorized a string: its likelihood rank among random look-alikes
(exposure) and whether greedy decoding reproduces it from its prefix (extraction).

Exposure (Carlini et al. 2019, "The Secret Sharer", sec. 4): rank the canary's
log-perplexity among candidates that differ only in the random secret; exposure =
log2(|candidates|) - log2(rank). Here the candidates are R secrets drawn at random, so

- ``exposure_rank`` = log2(R + 1) - log2(rank among the R + 1): at most log2(R + 1); an
  unseen canary averages about 1.4 bits (its rank is uniform);
- ``exposure`` extrapolates to the whole space of 10^digits secrets as the paper's sec. 4.3
  does: it fits a skew-normal distribution to the candidates' log-perplexities and takes
  -log2 of the fitted probability of a candidate scoring at least as well as the canary,
  capped at log2(10^digits).

A log-perplexity is the summed negative log-likelihood (nats) of the text's tokens, after a
document boundary and a newline (canaries are planted as lines of their own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Encoder = Callable[[str], list[int]]


@torch.inference_mode()
def sequence_nll(model: nn.Module, encode: Encoder, texts: Sequence[str], context: Sequence[int],
                 batch_size: int = 64) -> np.ndarray:
    """Summed NLL (nats) of each text's tokens given the ``context`` tokens before it."""
    device = next(model.parameters()).device
    out = np.empty(len(texts), dtype=np.float64)
    block = getattr(getattr(model, "cfg", None), "block_size", None)
    for start in range(0, len(texts), batch_size):
        ids = [list(context) + encode(t) for t in texts[start : start + batch_size]]
        if block is not None and max(map(len, ids)) > block:
            raise ValueError(f"a scored text is longer than the model's context ({block} tokens)")
        T = max(map(len, ids))
        x = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T - 1, dtype=torch.bool)
        for i, row in enumerate(ids):
            x[i, : len(row)] = torch.tensor(row)
            mask[i, len(context) - 1 : len(row) - 1] = True  # positions predicting the text's tokens
        x = x.to(device)
        logits, _ = model(x)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, T-1)
        out[start : start + len(ids)] = (-(logp * mask.to(device))).sum(1).cpu().numpy()
    return out


def rank_exposure(canary_nll: float, candidate_nll: np.ndarray) -> tuple[float, int]:
    """(exposure in bits within the sample, rank): rank 1 = the canary is the most likely;
    ties count half."""
    better = float((candidate_nll < canary_nll).sum()) + 0.5 * float((candidate_nll == canary_nll).sum())
    rank = 1 + better
    return math.log2(len(candidate_nll) + 1) - math.log2(rank), int(round(rank))


def extrapolated_exposure(canary_nll: float, candidate_nll: np.ndarray, space_bits: float) -> float:
    """-log2 P(candidate NLL <= canary NLL) under a skew-normal fit to the candidates (bits),
    in [0, space_bits]."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(candidate_nll)
    log_p = float(stats.skewnorm.logcdf(canary_nll, a, loc, scale))
    bits = -log_p / math.log(2) if math.isfinite(log_p) else space_bits
    return float(min(max(bits, 0.0), space_bits))
