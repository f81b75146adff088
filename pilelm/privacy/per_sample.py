"""Per-sample gradients, clipped and summed: the data-dependent half of a DP-SGD step.

DP-SGD (Abadi et al. 2016, Algorithm 1) bounds each example's influence on a step by clipping
its own gradient to L2 norm C before the gradients are summed and noised. Two ways to get
per-sample gradients here:

- ``vmap``: ``torch.func`` (``vmap(grad(loss))`` over ``functional_call``), one batched pass;
  the model runs unchanged on a batch of one inside the transform.
- ``loop``: one ordinary backward pass per sample; slower, but works for any model, e.g.
  BERT's masked-LM head, which selects the masked positions with a data-dependent shape
  (``h[labels != -100]``) that ``vmap`` cannot batch.

Why not Opacus' ``GradSampleModule``: its hooks see a layer's input and output, but pilelm's
GPT multiplies by the (tied) output projection inside a fused cross-entropy
(``models/fused_ce.py``) that never calls the layer, and BERT's decoder bias is a bare
parameter of the top module, for which Opacus falls back to ``vmap`` of the whole model,
which BERT's masked selection breaks. The accounting is Opacus' (``privacy/accountant.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from pilelm.models.spec import IGNORE_INDEX, Batch, ModelSpec

log = logging.getLogger(__name__)

LossFn = Callable[[Callable[..., Any], Batch], torch.Tensor]
"""(model or a functional stand-in for it, batch of one sample) -> that sample's scalar loss."""


def spec_loss(spec: ModelSpec) -> LossFn:
    """The training loss of one sample as the family's spec computes it in a training step,
    normalised by that sample's own target count (unfused: ``vmap`` cannot batch the fused
    cross-entropy's autograd function)."""

    def loss(model: Callable[..., Any], batch: Batch) -> torch.Tensor:
        counts = ((batch["labels"] != IGNORE_INDEX).sum().clamp(min=1), 1.0)
        kwargs = spec.train_kwargs(batch, counts, False)
        return model(batch["input_ids"], batch["labels"], **kwargs)[1]

    return loss


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per sample (Opacus' form, with 1e-6 against division by zero)."""
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


class ClippedGradients:
    """Accumulates the sum of clipped per-sample gradients over the chunks of one step.

    ``add(batch)`` computes each sample's gradient, clips it to ``max_norm`` and adds it to
    ``summed`` (fp32, keyed by parameter name); ``losses`` and ``norms`` keep the per-sample
    loss and pre-clipping norm for logging and tests.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, max_norm: float, method: str = "auto"):
        if method not in ("auto", "vmap", "loop"):
            raise ValueError(f"privacy.per_sample must be auto, vmap or loop, got {method!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.max_norm = max_norm
        self.method = method
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.summed: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []

    def reset(self) -> None:
        self.summed, self.losses, self.norms = {}, [], []

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.losses)

    def add(self, batch: Batch) -> None:
        if self.method == "loop":
            self._add_loop(batch)
            return
        try:
            self._add_vmap(batch)
        except Exception as e:  # an op without a batching rule, a data-dependent shape
            if self.method == "vmap":
                raise
            log.info("per-sample gradients: vmap is not possible for this model (%s: %s); "
                     "computing them one sample at a time", type(e).__name__, str(e).splitlines()[0][:200])
            self.method = "loop"
            self._add_loop(batch)
        else:
            self.method = "vmap"

    def _accumulate(self, grads: dict[str, torch.Tensor], losses: torch.Tensor) -> None:
        """grads: name -> (B, *shape) per-sample gradients; clip each sample and add."""
        B = losses.shape[0]
        sq = torch.zeros(B, dtype=torch.float32, device=losses.device)
        for g in grads.values():
            sq += g.reshape(B, -1).float().pow(2).sum(1)
        norms = sq.sqrt()
        factors = clip_factors(norms, self.max_norm)
        for name, g in grads.items():
            clipped = torch.einsum("b,b...->...", factors, g.float())
            if name in self.summed:
                self.summed[name] += clipped
            else:
                self.summed[name] = clipped
        self.losses.append(losses.detach().float())
        self.norms.append(norms)

    def _add_vmap(self, batch: Batch) -> None:
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in self.params.items()}
        buffers = dict(self.model.named_buffers())

        def sample_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], row: Batch) -> tuple[Any, Any]:
            # The model with these parameters: a callable the loss function can use as the module.
            def model(*args: Any, **kwargs: Any) -> Any:
                return functional_call(self.model, (p, b), args, kwargs)

            loss = self.loss_fn(model, {k: v.unsqueeze(0) for k, v in row.items()})
            return loss, loss.detach()

        grads, losses = vmap(grad(sample_loss, has_aux=True), in_dims=(None, None, 0),
                             randomness="different")(params, buffers, batch)
        self._accumulate(grads, losses)

    def _add_loop(self, batch: Batch) -> None:
        names, tensors = list(self.params), list(self.params.values())
        for i in range(batch["input_ids"].shape[0]):
            loss = self.loss_fn(self.model, {k: v[i : i + 1] for k, v in batch.items()})
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            self._accumulate({n: (torch.zeros_like(p) if g is None else g)[None]
                              for n, p, g in zip(names, tensors, grads, strict=True)}, loss.detach()[None])
