"""What a training run may spend: optimizer steps, tokens and wall-clock minutes.

The run ends at the first budget reached (``loop.max_steps``, ``loop.max_tokens``,
``loop.max_minutes``; 0 turns the last two off), and the learning-rate schedule spans the
budget, so "the best model in 10 minutes" is ``loop.max_minutes=10`` with the decay in its
last minutes.

- Steps and tokens are known in advance: a token budget is a step count,
  ``ceil(max_tokens / tokens_per_step)``, and the schedule is the step schedule over the
  smaller of the two (deterministic: a resumed run matches the uninterrupted one exactly).
- Minutes are not: the schedule follows the fraction of the budget used,
  ``max(step / total_steps, elapsed / seconds)`` (``optim.lr_multiplier_at_progress``).
  ``elapsed`` is the wall-clock time of the training loop (steps, periodic evaluations,
  checkpoints; not the start-up or the final evaluation), saved in every checkpoint, so the
  time spent before a stop or a kill counts after resuming (up to the checkpoint resumed
  from: work after it is redone, and its time counts again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilelm.training.optim import ScheduleConfig, lr_multiplier, lr_multiplier_at_progress


@dataclass(frozen=True)
class TrainingBudget:
    """The budget of one run, with the batch geometry resolved."""

    max_steps: int
    """``loop.max_steps``."""
    max_tokens: int
    """``loop.max_tokens`` (0 = no token budget)."""
    max_minutes: float
    """``loop.max_minutes`` (0 = no time budget)."""
    tokens_per_step: int
    """Tokens of one optimizer step over all ranks."""

    @property
    def total_steps(self) -> int:
        """Steps the step and token budgets allow (the time budget may end the run earlier)."""
        if not self.max_tokens:
            return self.max_steps
        return min(self.max_steps, math.ceil(self.max_tokens / self.tokens_per_step))

    @property
    def seconds(self) -> float:
        return 60.0 * self.max_minutes

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction (0..1) of the budget used after ``step`` steps and ``elapsed`` seconds."""
        used = step / self.total_steps
        if self.max_minutes:
            used = max(used, elapsed / self.seconds)
        return min(1.0, used)

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0

    def lr_multiplier(self, step: int, elapsed: float, schedule: ScheduleConfig) -> float:
        """The schedule's factor for optimizer step ``step`` (0-based)."""
        if not self.max_minutes:
            return lr_multiplier(step, self.total_steps, schedule)
        return lr_multiplier_at_progress(step, self.progress(step, elapsed), schedule)

    def describe(self) -> str:
        parts = [f"{self.total_steps} steps"]
        if self.max_tokens:
            parts.append(f"{self.max_tokens:,} tokens")
        if self.max_minutes:
            parts.append(f"{self.max_minutes:g} minutes")
        return " / ".join(parts)
