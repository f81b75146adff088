"""Beam search over a KV cache whose rows are reordered to follow their beams."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.inference.context import fit_prompt, model_device_dtype
from pilelm.models.gpt import KVCache


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float = 1.0,
) -> list[int]:
    """The most likely continuation found by beam search; returns the new tokens (no eos).

    Each step expands every live beam and keeps the ``num_beams`` best continuations; a
    continuation that ends in eos becomes a finished hypothesis scored by sum log p /
    length ** length_penalty (Wu et al. 2016 without the +5 smoothing; Hugging Face's form).
    Search stops once ``num_beams`` hypotheses are finished and no live beam can beat the
    worst of them, or at ``max_new_tokens``.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    cfg = model.cfg
    device, dtype = model_device_dtype(model)
    prompt = fit_prompt(prompt, max_new_tokens, cfg.block_size, eos_id)
    cache = KVCache(cfg, 1, len(prompt) + max_new_tokens, device, dtype)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    scores = torch.zeros(1, device=device, dtype=torch.float64)  # sum log p of each live beam
    beams: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    V = logits.size(-1)

    def normed(score: float, length: int) -> float:
        return score / (length**length_penalty)

    for t in range(max_new_tokens):
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1).double()  # (b, V)
        cand = (scores[:, None] + logprobs).view(-1)
        k = min(2 * num_beams, cand.numel())
        top_scores, top_idx = cand.topk(k)
        parents, next_tokens, next_scores = [], [], []
        for rank, (s, i) in enumerate(zip(top_scores.tolist(), top_idx.tolist(), strict=True)):
            beam, tok = divmod(i, V)
            if tok == eos_id:
                if rank < num_beams:  # an eos outside the best num_beams does not count
                    finished.append((normed(s, t + 1), beams[beam]))
                continue
            parents.append(beam)
            next_tokens.append(tok)
            next_scores.append(s)
            if len(parents) == num_beams:
                break
        finished.sort(key=lambda h: h[0], reverse=True)
        del finished[num_beams:]
        if not parents:  # every continuation ended: no live beam is left
            beams = []
            break
        beams = [beams[b] + [tok] for b, tok in zip(parents, next_tokens, strict=True)]
        scores = torch.tensor(next_scores, device=device, dtype=torch.float64)
        if len(finished) >= num_beams and finished[-1][0] >= normed(next_scores[0], t + 1):
            beams = []  # no live beam can beat the finished ones (HF's early_stopping=False rule)
            break
        if t + 1 == max_new_tokens:
            break
        cache.reorder(torch.tensor(parents, device=device))
        logits, _ = model(torch.tensor(next_tokens, device=device)[:, None], cache=cache, last_only=True)
    for s, b in zip(scores.tolist(), beams, strict=False):
        finished.append((normed(s, len(b)), b))
    if not finished:
        return []
    return max(finished, key=lambda h: h[0])[1]
