"""The ``privacy`` section of the train config: differentially private training (DP-SGD).

Only the settings live here (the trainer reads them); the mechanism (per-sample clipping,
noise, sampling, the accountant) is ``pilelm/privacy/dpsgd.py``, which the trainer reaches
through the hook table in ``pilelm/core/stages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PrivacyConfig:
    enabled: bool = False
    """Train with DP-SGD (Abadi et al. 2016): per-sample gradient clipping and Gaussian noise,
    with the privacy spent (epsilon at delta) logged per step and stored in the manifest."""
    target_epsilon: float = 0.0
    """The epsilon to reach after loop.max_steps: the noise multiplier is solved for it with
    the accountant (give this or noise_multiplier, not both)."""
    noise_multiplier: float = 0.0
    """Noise std / max_grad_norm (sigma); used as given (give this or target_epsilon)."""
    max_grad_norm: float = 1.0
    """Each sample's gradient is clipped to this L2 norm (C) before the noise N(0, sigma^2 C^2)
    is added to their sum."""
    delta: float = 0.0
    """The delta of (epsilon, delta)-DP; 0 = 1/N for N training samples (windows)."""
    sampling: Literal["poisson", "shuffle"] = "poisson"
    """poisson: each training window joins a step independently with probability q = expected
    batch / N (the sampling the accountant assumes); shuffle: the usual shuffled fixed-size
    batches, accounted as if Poisson at the same q (the common approximation; see docs/privacy.md)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant: rdp (Renyi DP, Mironov 2017) or prv (privacy random variables,
    Gopi et al. 2021; tighter)."""
    per_sample: Literal["auto", "vmap", "loop"] = "auto"
    """How per-sample gradients are computed: vmap (torch.func, one batched pass), loop (one
    backward pass per sample; works for any model), auto = vmap, else loop."""
    secure_rng: bool = True
    """Draw which windows join a step (poisson sampling) and the noise from the OS's entropy
    (``secrets``), as the accounting assumes: nobody can replay them. false draws both from
    loop.seed and the step: reproducible (a resumed run repeats the uninterrupted one exactly;
    for tests and debugging), but anyone who knows the seed can, so the epsilon does not hold."""

    def __post_init__(self) -> None:
        if self.target_epsilon < 0 or self.noise_multiplier < 0:
            raise ValueError("privacy.target_epsilon and privacy.noise_multiplier must be >= 0")
        if not self.enabled and (self.target_epsilon > 0 or self.noise_multiplier > 0):
            given = "privacy.target_epsilon" if self.target_epsilon > 0 else "privacy.noise_multiplier"
            raise ValueError(f"{given} is set but privacy.enabled=false: the run would train without "
                             f"DP-SGD; add privacy.enabled=true to train privately, or drop {given}")
        if self.enabled and (self.target_epsilon > 0) == (self.noise_multiplier > 0):
            raise ValueError("privacy.enabled=true needs exactly one of privacy.target_epsilon (e.g. 8) "
                             "or privacy.noise_multiplier (e.g. 1.0)")
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"privacy.delta must be in [0, 1) (0 = 1/N), got {self.delta}")
