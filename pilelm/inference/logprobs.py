"""Log-probabilities of tokens under the model, as decoding computes them.

``TokenLogprob``: one token's log-probability and the ``k`` most likely tokens at its position.
``token_logprobs`` turns a step's logits and the tokens chosen into them; ``prompt_logprobs``
scores a prompt's own tokens from the logits of its prefill.

The distribution is the model's own (log-softmax of the raw logits, before repetition
penalty, temperature, top-k and top-p), as vLLM reports by default and as lm-evaluation-harness
needs for log-likelihoods; it does not depend on how the token was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    """log p(token | everything before it), natural log."""
    top: list[tuple[int, float]]
    """The most likely tokens at this position with their log-probabilities, most likely first."""


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: list[int]) -> list[TokenLogprob]:
    """logits (n, V), chosen (n,) token ids, top[i] = how many alternatives row i wants."""
    logp = logits.float().log_softmax(dim=-1)  # (n, V)
    chosen_lp = logp.gather(1, chosen[:, None].long())[:, 0].tolist()  # (n,)
    k = min(max(top, default=0), logp.size(-1))
    if k:
        top_lp, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))  # (n, k) each
    else:
        top_lp = top_ids = [[] for _ in top]
    return [
        TokenLogprob(int(t), lp, list(zip(ids[:want], lps[:want], strict=True)))
        for t, lp, ids, lps, want in zip(chosen.tolist(), chosen_lp, top_ids, top_lp, top, strict=True)
    ]


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """The prompt's own tokens scored by the logits of its prefill: logits (len(prompt) - 1, V)
    where row j predicts prompt[j + 1]. The first token has no context: its entry is None (the
    OpenAI API's ``null``)."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    assert logits.size(0) == len(prompt) - 1, (logits.shape, len(prompt))
    targets = torch.tensor(prompt[1:], device=logits.device)
    return [None, *token_logprobs(logits, targets, [top] * (len(prompt) - 1))]
