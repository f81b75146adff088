"""Optimisers and learning-rate schedules.

- ``build_optimizer``: AdamW (torch's fused/foreach kernels), our ``LAMB`` (You et al. 2019,
  "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2) or
  ``Muon`` (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Newton-Schulz
  orthogonalised momentum for 2-D hidden matrices, AdamW for everything else).
  Weight decay applies to matrices (dim >= 2: linear weights and embeddings, as nanoGPT);
  biases and norm gains are never decayed.
- Schedules are pure functions of the step (``lr_multiplier``; every loop, pretraining and
  each fine-tuning task, calls it), so a resumed run needs nothing but the step number: linear warmup then cosine to a floor; warmup-stable-decay (Hu et al. 2024,
  MiniCPM, sec. 4); constant after warmup. A wall-clock budget has no step count known in
  advance: ``lr_multiplier_at_progress`` shapes the same schedules over the fraction of the
  budget used (``training/budget.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb", "muon"] = "adamw"
    """adamw, lamb (layer-wise trust ratio, for large batches) or muon (hidden matrices; AdamW for the rest)."""
    lr: float = 6e-4
    """Peak learning rate (AdamW/LAMB, and Muon's AdamW part)."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.95
    """Second-moment decay (0.95 as GPT-3/nanoGPT; 0.999 is the Adam paper default)."""
    eps: float = 1e-8
    """Denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (biases and norm gains are never decayed)."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """AdamW kernel: fused (one kernel for all tensors), foreach, or a per-tensor loop; auto picks fused."""
    muon_lr: float = 0.02
    """Muon: learning rate of the orthogonalised update of hidden matrices."""
    muon_momentum: float = 0.95
    """Muon: Nesterov momentum."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        for key in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.eps > 0, optim.weight_decay >= 0 and optim.grad_clip >= 0 are required")
        if self.muon_ns_steps < 1:
            raise ValueError(f"optim.muon_ns_steps must be >= 1, got {self.muon_ns_steps}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine (warmup, then cosine to the floor), wsd (warmup, stable, linear decay at the end) or constant."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr over this many steps."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak lr (Chinchilla/nanoGPT: 0.1)."""
    decay_frac: float = 0.2
    """wsd: the final fraction of the steps spent decaying linearly to the floor."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"schedule.decay_frac must be in (0, 1], got {self.decay_frac}")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The factor on the peak lr for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: stable at 1 until the last decay_frac of the steps, then linear to the floor.
    decay_steps = max(1, round(cfg.decay_frac * total_steps))
    decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def lr_multiplier_at_progress(step: int, progress: float, cfg: ScheduleConfig) -> float:
    """The factor on the peak lr at optimizer step ``step`` (0-based) when ``progress`` (0..1)
    of the budget is used: warmup over the first ``warmup_steps`` steps, then cosine over the
    whole budget, or WSD's stable phase until ``1 - decay_frac`` and a linear decay to the
    floor at 1 (the trapezoid of Hu et al. 2024 and Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations")."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    p = min(1.0, max(0.0, progress))
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    decay_start = 1.0 - cfg.decay_frac
    if p < decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * (p - decay_start) / cfg.decay_frac


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Scale every param group's ``base_lr`` (set by ``build_optimizer``) by ``multiplier``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


def _is_decayed(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors (biases, norm gains: not decayed).

    ``named_parameters`` yields a tied weight once, so it is updated once.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _is_decayed(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class LAMB(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2019 (arXiv:1904.00962v5), with bias correction.

    Per parameter tensor x with gradient g, at step t:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        u = r + wd x
        x = x - lr * (||x|| / ||u||) * u      (the trust ratio is 1 when either norm is 0)
    The paper's scaling function phi is the identity here (their experiments' choice).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                x = p.float()
                u = r + group["weight_decay"] * x if group["weight_decay"] else r
                x_norm, u_norm = x.norm(), u.norm()
                trust = torch.where((x_norm > 0) & (u_norm > 0), x_norm / u_norm, torch.ones_like(x_norm))
                p.copy_(x - group["lr"] * trust * u)
        return loss


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> U V^T) with the quintic Newton-Schulz
    iteration of Jordan et al. 2024 (coefficients 3.4445, -4.7750, 2.0315), in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups marked ``use_muon`` (2-D hidden matrices), AdamW for the other groups.

    Muon step (Jordan et al. 2024): buf = mu buf + g; update = NS5(g + mu buf) (Nesterov),
    scaled by sqrt(max(1, rows / cols)); x = x (1 - lr wd) - lr update.
    """

    def __init__(self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 muon_lr: float, momentum: float, ns_steps: int):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "use_muon": False,
                    "momentum": momentum, "ns_steps": ns_steps}
        for g in param_groups:
            if g.get("use_muon"):
                g.setdefault("lr", muon_lr)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if group["use_muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    update = newton_schulz(g.add(buf, alpha=group["momentum"]), group["ns_steps"])
                    update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                    continue
                b1, b2 = group["betas"]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1**t))
        return loss


def _muon_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon for the 2-D weights inside the blocks; embeddings, output head and vectors get AdamW
    (the split recommended by Jordan et al.: Muon is for hidden layers only)."""
    muon, adam_decay, adam_no_decay = [], [], []
    embed_like = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) not in embed_like and "head" not in name:
            muon.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    return [
        {"params": muon, "use_muon": True, "weight_decay": weight_decay},
        {"params": adam_decay, "weight_decay": weight_decay},
        {"params": adam_no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``'s parameters; every group gets ``base_lr`` for
    ``set_lr``."""
    betas = (cfg.beta1, cfg.beta2)
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if sharded and cfg.name != "adamw":
        # Both need whole-tensor quantities (LAMB's per-layer norms, Muon's orthogonalisation of
        # the full matrix) that a per-rank shard does not have.
        raise ValueError(f"optim.name={cfg.name} does not support FSDP-sharded parameters; use "
                         "optim.name=adamw with loop.distributed=fsdp, or loop.distributed=ddp")
    if cfg.name == "muon":
        opt: torch.optim.Optimizer = Muon(
            _muon_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps,
            muon_lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
        )
    elif cfg.name == "lamb":
        opt = LAMB(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps)
    else:
        params = param_groups(model, cfg.weight_decay)
        # Fused AdamW exists for CPU and CUDA tensors; DTensor (FSDP2) shards take foreach.
        impl = cfg.impl
        if impl == "auto":
            impl = "foreach" if sharded else "fused"
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, betas=betas, eps=cfg.eps,
            fused=impl == "fused", foreach=impl == "foreach" if impl != "fused" else None,
        )
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt
