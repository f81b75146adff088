"""An exponential moving average of the weights, for evaluation (``loop.ema``).

Polyak averaging (Polyak & Juditsky 1992): the average of the iterates of a noisy optimizer
sits closer to the minimum than the last iterate; for language models a short-horizon EMA
helps most when the learning rate stays high (no decay). The average is kept in fp32 and
starts from the initial weights with the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=...)``: decay = min(decay, (1 + t) / (10 + t)) at
update t, so the first updates are not dominated by the random initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


class WeightEMA:
    """fp32 shadow copies of named tensors (the parameters, or their fp32 masters)."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [named[n].detach().float() for n in names], 1.0 - d)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, params: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block ``params`` (the model's own) hold the average; restored after."""
        saved = {n: params[n].detach().clone() for n in self.shadow}
        for n, t in self.shadow.items():
            params[n].copy_(t)
        try:
            yield
        finally:
            for n, t in saved.items():
                params[n].copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def state_dict_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The average under every name of ``model``'s state dict (tied aliases too)."""
        canonical = {id(p): n for n, p in model.named_parameters()}
        return {n: self.shadow[canonical[id(p)]] for n, p in model.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        self.updates = updates


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an EMA averages: the parameters, or their fp32 masters under pure bf16
    (``training/precision.py``)."""
    masters = getattr(model, "_pilelm_masters", {})
    return {n: masters.get(p, p) for n, p in model.named_parameters()}
