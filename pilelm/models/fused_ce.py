"""Output projection + cross-entropy in row chunks, never materialising the (N, V) logits.

For a language model the last matmul and its softmax dominate memory traffic: at N = 4096
tokens and V = 8192 the fp32 logits, their log-softmax and its gradient are three 134 MB
tensors. Here the rows are processed in chunks; in a training forward pass each chunk's
gradient ``(softmax - onehot) / n_valid`` is formed at once and multiplied out into
``dx`` and ``dW``, so the backward pass only rescales stored gradients (the approach of
Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989, sec. 3.3).
The three matmuls (logits, dx, dW) are the same as the unfused path's.

The result equals ``F.cross_entropy(x @ W.T, targets, ignore_index=-100)`` (mean over
non-ignored targets); matmuls run in the autocast dtype when autocast is on, softmax in fp32.
Two options of the training recipe fold into the same pass: logit soft-capping
``z -> cap * tanh(z / cap)`` (Gemma 2, Gemma Team 2024, sec. 2; the modded-nanogpt speedrun)
and the z-loss ``coef * logsumexp(z)^2`` per target (PaLM, Chowdhery et al. 2022, sec. 5),
which keeps the softmax normaliser near 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pilelm.models.spec import IGNORE_INDEX


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _chunked(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, with_grad: bool,
    softcap: float = 0.0, z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss/dx, d loss/dW); the gradients only ``with_grad``.

    Per chunk of rows: logits (compute dtype) -> log-softmax in fp32 (one kernel) -> loss from
    the target column; the gradient is exp(log p) - onehot, cast once to the compute dtype.
    The 1/n_valid scale and the ignored rows' zeros are applied to the (n, C) sides of the
    two gradient matmuls, not to the (n, V) gradient: fewer passes over the big tensor.
    """
    dt = _compute_dtype(x)
    acc = torch.promote_types(dt, torch.float32)  # softmax precision: at least fp32
    with torch.autocast(x.device.type, enabled=False):
        xc, wc = x.to(dt), weight.to(dt)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        row_scale = (valid.to(acc) / n_valid).to(dt)[:, None]  # (N, 1)
        total = torch.zeros((), device=x.device, dtype=acc)
        dx = torch.empty_like(xc) if with_grad else None
        dw = torch.zeros(weight.shape, device=x.device, dtype=acc) if with_grad else None
        for s in range(0, x.size(0), chunk):
            rows = slice(s, s + chunk)
            ok = valid[rows]
            t = torch.where(ok, targets[rows], 0)[:, None]  # (n, 1)
            z = xc[rows] @ wc.T  # (n, V)
            capped = None
            if softcap:
                capped = torch.tanh(z.to(acc) / softcap)
                z = capped * softcap
            logp = torch.log_softmax(z, dim=-1, dtype=acc)  # (n, V)
            total -= (logp.gather(1, t).squeeze(1) * ok).sum()
            lse = None
            if z_loss:
                lse = torch.logsumexp(z.to(acc), dim=-1)  # (n,)
                total += z_loss * (lse.square() * ok).sum()
            if with_grad:
                # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere;
                # the z-loss adds 2 coef lse softmax; the cap multiplies by 1 - tanh^2.
                probs = logp.exp_()
                if lse is not None:
                    probs.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
                grad = probs.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=acc, device=x.device))
                if capped is not None:
                    grad.mul_(1.0 - capped.square_())
                g = grad.to(dt)
                scale = row_scale[rows]
                dx[rows] = (g @ wc).mul_(scale)
                dw.add_(g.T @ (xc[rows] * scale))
    return total / n_valid, dx, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                softcap: float, z_loss: float) -> torch.Tensor:
        loss, dx, dw = _chunked(x, weight, targets, chunk, True, softcap, z_loss)
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dx, dw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (dx * grad_out).to(x_dtype), (dw * grad_out).to(w_dtype), None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024, *,
    softcap: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``x (N, C) @ weight (V, C).T`` against ``targets (N,)``
    (``-100`` ignored), computed ``chunk`` rows at a time; logits soft-capped at ``softcap``
    and ``z_loss`` * logsumexp^2 added when those are non-zero."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _chunked(x, weight, targets, chunk, False, softcap, z_loss)[0]
    return _LinearCrossEntropy.apply(x, weight, targets, chunk, softcap, z_loss)


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (identity when cap is 0)."""
    return cap * torch.tanh(logits / cap) if cap else logits


def cross_entropy_with_z_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits over non-ignored targets, plus ``z_loss`` *
    logsumexp^2 averaged over the same targets: the unfused form of ``linear_cross_entropy``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    if z_loss:
        valid = targets != IGNORE_INDEX
        loss = loss + z_loss * (logits.logsumexp(-1).square() * valid).sum() / valid.sum().clamp(min=1)
    return loss


def reference_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            softcap: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """The unfused computation the chunked one must equal (tests)."""
    return cross_entropy_with_z_loss(soft_cap((x @ weight.T).float(), softcap), targets, z_loss)  # fp32, as before
