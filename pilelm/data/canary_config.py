"""The ``privacy`` section of the prepare config: canaries planted in the train split.

Only the settings live here; planting them (and auditing a model trained on them) is
``pilelm/privacy/canaries.py``, reached through the hook table in ``pilelm/core/stages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CanaryConfig:
    canaries: int = 0
    """Random canary sequences (Carlini et al. 2019, "The Secret Sharer") to plant in the train
    split per repetition count, plus privacy.references never planted; written to
    OUT/canaries.json for `pilelm audit`. 0 = none."""
    references: int = 0
    """Never-planted canaries drawn as the reference (the exposure of chance, about 1.4 bits
    on average with a spread as large); 0 = as many as privacy.canaries. More references
    pin the chance level down more precisely."""
    repetitions: list[int] = field(default_factory=lambda: [1, 10, 100])
    """How many training documents receive each canary of a group (one group per count)."""
    format: str = "the account number of customer {key} is {secret}"
    """Canary text; {secret} is replaced by random digits (what the audit ranks), {key} (optional)
    by four random capital letters that tell the canaries apart."""
    secret_digits: int = 8
    """Digits in a secret: 10^digits possible secrets."""
    seed: int = 0
    """Seed of the secrets, keys and the documents that receive them."""

    def __post_init__(self) -> None:
        if self.canaries < 0 or self.references < 0:
            raise ValueError(f"privacy.canaries and privacy.references must be >= 0, got {self.canaries} and "
                             f"{self.references}")
        if not self.repetitions or any(r < 1 for r in self.repetitions):
            raise ValueError(f"privacy.repetitions must be counts >= 1, got {self.repetitions}")
        if "{secret}" not in self.format:
            raise ValueError(f"privacy.format must contain {{secret}}, got {self.format!r}")
        if not 4 <= self.secret_digits <= 18:
            raise ValueError(f"privacy.secret_digits must be in 4..18, got {self.secret_digits}")
