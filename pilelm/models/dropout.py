"""Dropout (Srivastava et al. 2014) that is cheap on CPU.

aten's CPU dropout draws one Bernoulli sample per element (``bernoulli_``), which ran at about
70 M elements/s per core here: a quarter of a fine-tuning step of the demo-sized GPT-2 at
dropout 0.1 (``benchmarks/finetune_throughput.py``'s profile). This one draws 64 random bits
per four elements (``random_`` on int64, about 10x fewer generator calls), reads them as 16-bit
integers and keeps an element when its integer clears ``p`` quantised to 1/65536; backward
multiplies by the saved scaled mask. Same semantics as ``F.dropout`` (kept elements scaled by
1/(1-p), torch's seeded CPU generator, so runs repeat), about twice as fast forward+backward.
Other devices and compiled graphs keep ``F.dropout`` (their kernels are already fast).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 16


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean (x's shape): True with probability 1 - round(p * 65536) / 65536."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    threshold = round(p * _LEVELS) - _LEVELS // 2  # int16 values are uniform over [-32768, 32767]
    return bits.view(torch.int16)[:n].view(x.shape) >= threshold


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        kept = 1.0 - round(p * _LEVELS) / _LEVELS
        mask = torch.zeros(x.shape, dtype=x.dtype).masked_fill_(_keep_mask(x, p), 1.0 / kept)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the fast CPU path above."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    return _CpuDropout.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) through ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
