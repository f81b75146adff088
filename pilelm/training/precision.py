"""Numeric precision policies for training, and the machine's measured matmul rate (for MFU).

- ``fp32``: fp32 weights, activations and optimizer.
- ``bf16-autocast``: fp32 weights; ``torch.autocast`` runs matmuls/attention in bf16 (each
  weight is cast to bf16 in every forward pass).
- ``bf16``: the model itself is bf16 (weights, activations, gradients: no casts in the hot
  path, half the activation memory); the optimizer holds fp32 master weights, the bf16 gradients are accumulated into fp32
  master gradients as they arrive, and the updated masters are copied back into the bf16
  weights (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1). Checkpoints hold
  the fp32 masters. Under FSDP2 the same scheme is FSDP's ``MixedPrecisionPolicy``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn as nn

from pilelm.models.dtypes import bf16_native


class Precision:
    """A precision policy: model preparation, autocast context, optimizer wrapping, state I/O."""

    def __init__(self, name: str, device: torch.device, distributed: str | None = None):
        self.name = name
        self.device = device
        # Under FSDP2 pure bf16 is done by the sharding wrapper's mixed-precision policy.
        self.masters = name == "bf16" and distributed != "fsdp"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_model(self, model: nn.Module) -> None:
        if self.masters:
            # Parameters only: buffers such as rotary frequencies keep their fp32 precision.
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        if not self.masters:
            return optimizer
        return MasterWeights(optimizer, model)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights to save: the fp32 masters under the model's names when there are masters."""
        state = model.state_dict()
        if self.masters:
            by_id = {id(p): m for p, m in getattr(model, "_pilelm_masters", {}).items()}
            for name, p in model.named_parameters(remove_duplicate=False):
                if id(p) in by_id:
                    state[name] = by_id[id(p)].detach()
        return state

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load saved weights (and the fp32 masters from them); tied aliases may be absent."""
        missing, unexpected = model.load_state_dict(state, strict=False)
        params = dict(model.named_parameters(remove_duplicate=False))
        untied = [k for k in missing if not any(params.get(k) is params.get(s) for s in state)]
        if untied or unexpected:
            raise ValueError(f"checkpoint weights do not match the model: missing {untied}, "
                             f"unexpected {unexpected}")
        if self.masters:
            by_id = {id(p): m for p, m in getattr(model, "_pilelm_masters", {}).items()}
            for name, p in model.named_parameters():
                if id(p) in by_id and name in state:
                    by_id[id(p)].data.copy_(state[name])


class MasterWeights(torch.optim.Optimizer):
    """Runs ``optimizer`` on fp32 copies of a bf16 model's parameters.

    The wrapped optimizer's param groups are rebound to the fp32 masters (its state is still
    empty), a post-accumulate-grad hook adds each bf16 gradient into the master's fp32
    gradient and frees it, and ``step`` copies the updated masters back into the model.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.inner = optimizer
        self.model = model
        self.masters: dict[nn.Parameter, nn.Parameter] = {}
        for group in optimizer.param_groups:
            rebound = []
            for p in group["params"]:
                m = nn.Parameter(p.detach().float().clone())
                self.masters[p] = m
                rebound.append(m)
                p.register_post_accumulate_grad_hook(self._accumulate_into(m))
            group["params"] = rebound
        model._pilelm_masters = self.masters  # type: ignore[assignment]
        # Share the inner optimizer's groups and state so schedulers and state_dict see them.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults

    @staticmethod
    def _accumulate_into(master: nn.Parameter):
        def hook(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self.inner.step(closure)
        for p, m in self.masters.items():
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in self.masters:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


def resolve_precision(name: str, device: torch.device, distributed: str | None = None) -> Precision:
    """``auto`` -> bf16-autocast where bf16 matmuls are native, else fp32.

    Not pure ``bf16``: it is barely faster than autocast (matmuls dominate either way; docs/train.md),
    and autocast keeps the residual stream and LayerNorms in fp32, the safer
    default; pure ``bf16`` is for when activation memory matters (its loss matches autocast's
    and fp32's in our runs). ``distributed`` is "ddp" or "fsdp" under torchrun, else None.
    """
    if name == "auto":
        name = "bf16-autocast" if bf16_native(device) else "fp32"
    elif name != "fp32" and not bf16_native(device):
        raise ValueError(f"loop.precision={name}: this {device.type} has no native bf16; use loop.precision=fp32")
    if name == "bf16" and distributed == "ddp":
        if device.type == "cuda":
            name = "bf16-autocast"
        else:
            raise ValueError("loop.precision=bf16 (bf16 weights + fp32 masters) is single-process or FSDP only; "
                             "with DDP use loop.precision=bf16-autocast, or loop.distributed=fsdp")
    return Precision(name, device, distributed)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 0.3) -> float:
    """Measured dense matmul FLOP/s of ``device`` in ``dtype`` (the MFU denominator).

    The operands come from a private generator: a run measures at every start, after a resumed
    checkpoint's RNG state was restored, and must not move the generator dropout draws from."""
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(8):
            a @ b
        reps += 8
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
