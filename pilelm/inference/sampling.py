"""Choosing the next token: per-request sampling settings and the batched sampler.

``SamplingParams`` holds one request's settings: greedy (temperature 0), temperature, top-k,
top-p, repetition penalty, stop strings, max new tokens, seed. It is the one definition of
these options: ``pilelm generate``'s config embeds it (``GenerateConfig.sampling``) and
``pilelm serve`` converts each request into it. Its defaults are the OpenAI API's
(temperature 1, top_p 1, 16 tokens; top-k and the repetition penalty off): the model's own,
unfiltered distribution, which is what an API client that omits a field expects. ``pilelm
generate`` starts from the one named preset ``GENERATE_PRESET`` instead. ``RowSampler`` holds the
settings of every row of a running batch as tensors and turns a step's logits into one token
per row; each row samples with its own seeded ``torch.Generator``, so a row's tokens do not
depend on the other rows of the batch.

The logits processors follow the order and formulas of Hugging Face ``generate``
(repetition penalty, temperature, top-k, top-p), so greedy decoding gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FLOAT32 = torch.finfo(torch.float32)


def float32_problem(value: float) -> str | None:
    """Why ``value`` cannot be a float32 sampling setting, or None when it can.

    Sampling runs in float32: a nonzero value below the smallest normal float32 (1.2e-38)
    becomes 0 or a subnormal there (``temperature: 1e-40`` would divide the logits by ~0), and
    one above 3.4e38 becomes inf."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if value != 0 and abs(value) < FLOAT32.tiny:
        return f"{value:g} is too close to 0 for float32 (the smallest normal float32 is {FLOAT32.tiny:.3g}); use a larger value (or 0 where 0 is allowed)"
    if abs(value) > FLOAT32.max:
        return f"{value:g} overflows float32 (the largest float32 is {FLOAT32.max:.3g})"
    return None


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    """Most tokens to generate per prompt (0: none; the prompt is only prefilled, e.g. to score it)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL penalty (Keskar et al. 2019) on tokens already in the prompt or output; 1 = off."""
    stop: list[str] = field(default_factory=list)
    """Stop at the first of these strings (which is cut from the text; on the command line \\n, \\t, \\r are unescaped)."""
    seed: int | None = None
    """Seed of the sampler (prompt or choice i of a batch uses seed + i); None draws one from torch's global RNG."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives; None = off (pilelm serve's logprobs; pilelm generate refuses it)."""
    prompt_logprobs: int | None = None
    """Report the prompt's own tokens' log-probabilities (and this many alternatives); None = off (serve's echo + logprobs; generate refuses it)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for key in ("logprobs", "prompt_logprobs"):
            if (getattr(self, key) or 0) < 0:
                raise ValueError(f"{key} must be >= 0 (or None = off), got {getattr(self, key)}")
        for key in ("temperature", "top_p", "repetition_penalty"):
            problem = float32_problem(getattr(self, key))
            if problem is not None:
                raise ValueError(f"{key}: {problem}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


GENERATE_PRESET = SamplingParams(max_new_tokens=128, temperature=0.8, top_p=0.95)
"""``pilelm generate``'s starting point (each option can be overridden): a longer sample, a
little colder and without the unlikely tail (nucleus sampling, Holtzman et al. 2019), which
reads better from small models than their raw distribution."""


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (None: a seed drawn from torch's global RNG)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL (Keskar et al. 2019, eq. in sec. 4.1), as Hugging Face applies it: a seen token's
    positive logit is divided by the penalty, a negative one multiplied. logits (b, V) float;
    seen (b, V) bool; penalty (b,)."""
    pen = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k then top-p (Holtzman et al. 2019) filtering of tempered logits (b, V).

    Returns (filtered logits sorted descending, their token ids); removed tokens are -inf.
    The most likely token always survives.
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # (b, V)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    remove = (top_k[:, None] > 0) & (ranks[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach top_p.
    remove = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf")), sorted_ids


class RowSampler:
    """Per-row sampling settings of the rows still decoding, as tensors."""

    def __init__(self, params: list[SamplingParams], device: torch.device, vocab: int):
        self.params = params
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=device, dtype=torch.long)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        self.generators = [seeded_generator(p.seed, device) for p in params]
        self.failed: list[int] = []
        """Rows of the last call whose probabilities were not finite (they got no token)."""
        self._update()

    def _update(self) -> None:
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in self.params)
        self.sampled_rows = [j for j, p in enumerate(self.params) if p.temperature > 0]

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        self.params = [self.params[i] for i in rows]
        self.temperature = self.temperature[index]
        self.top_k = self.top_k[index]
        self.top_p = self.top_p[index]
        self.penalty = self.penalty[index]
        self.generators = [self.generators[i] for i in rows]
        self._update()

    def extend(self, other: RowSampler) -> None:
        """Append ``other``'s rows after these."""
        self.params = self.params + other.params
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k = torch.cat([self.top_k, other.top_k])
        self.top_p = torch.cat([self.top_p, other.top_p])
        self.penalty = torch.cat([self.penalty, other.penalty])
        self.generators = self.generators + other.generators
        self._update()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (b, V) float32 -> next tokens (b,).

        A sampled row whose probabilities are not finite (an extreme temperature or penalty
        overflowing float32, or non-finite logits) gets no token: it is listed in ``failed``
        (its entry in the result is meaningless) and the other rows sample as usual."""
        self.failed: list[int] = []
        if self.use_penalty and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        tokens = logits.argmax(dim=-1)
        rows = self.sampled_rows
        if rows:
            index = torch.tensor(rows, device=logits.device)
            tempered = logits[index] / self.temperature[index, None]
            filtered, ids = filter_top_k_top_p(tempered, self.top_k[index], self.top_p[index])
            probs = filtered.softmax(dim=-1)
            finite = torch.isfinite(probs).all(dim=-1).tolist()  # (r,)
            for j, row in enumerate(rows):
                if not finite[j]:  # multinomial would raise for the whole batch
                    self.failed.append(row)
                    continue
                choice = torch.multinomial(probs[j], 1, generator=self.generators[row])
                tokens[row] = ids[j, choice[0]]
        return tokens

    def describe(self, row: int) -> str:
        """Row ``row``'s settings that can overflow float32, for an error message."""
        p = self.params[row]
        return f"temperature={p.temperature:g}, top_p={p.top_p:g}, repetition_penalty={p.repetition_penalty:g}"
