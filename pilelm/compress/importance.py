"""Importance of a GPT's attention heads and MLP channels, the score structured pruning ranks by.

Three criteria, each giving per block an ``(n_head,)`` and a ``(d_ff,)`` score (higher = keep):

- ``weight`` (data-free): a head's is the norm of its query/key/value rows times the norm of
  its output-projection columns; a channel's, the norm of its input row times that of its
  output column (the magnitude criterion of Li et al. 2017, "Pruning Filters for Efficient
  ConvNets", applied per unit).
- ``taylor``: the first-order Taylor estimate of the loss change when a unit's weights are
  removed, ``sum |w * dL/dw|`` over every weight (and bias) that belongs to the unit, summed
  over the calibration batches (Molchanov et al. 2017, "Pruning Convolutional Neural Networks
  for Resource Efficient Inference", eq. 8; per weight and then summed per unit, as in
  Molchanov et al. 2019). A head whose output projection is zero scores exactly 0: its
  projection weights are 0 and no gradient reaches its query/key/value rows.
- ``activation``: the mean absolute activation of the unit on the calibration batches: for a
  channel, ``|gelu(fc(x))|`` (the input of the MLP's output projection); for a head, its
  attention output (its ``head_dim`` slice of the attention projection's input), averaged over
  tokens and that slice (the mean-activation criterion of Molchanov et al. 2017, sec. 2.2).
  It ignores the outgoing weights, so a head whose projection is zero can still rank high.

Calibration batches are the first windows of the token split (``calibration_batches``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from pilelm.models.gpt import GPT

Importance = Literal["weight", "taylor", "activation"]
IMPORTANCE: tuple[str, ...] = ("weight", "taylor", "activation")
NEEDS_DATA = ("taylor", "activation")

Scores = list[tuple[torch.Tensor, torch.Tensor]]
"""Per block: (head scores (n_head,), channel scores (d_ff,))."""


def head_importance(model: GPT, layer: int) -> torch.Tensor:
    """(n_head,) weight-norm importance of each head of block ``layer``."""
    cfg = model.cfg
    attn = model.blocks[layer].attn
    nh, hs = cfg.n_head, cfg.head_size
    qkv = attn.qkv.weight.detach().float().view(3, nh, hs, -1)  # (3, nh, hs, C)
    proj = attn.proj.weight.detach().float().view(-1, nh, hs)  # (C, nh, hs)
    return qkv.pow(2).sum(dim=(0, 2, 3)).sqrt() * proj.pow(2).sum(dim=(0, 2)).sqrt()


def channel_importance(model: GPT, layer: int) -> torch.Tensor:
    """(d_ff,) weight-norm importance of each MLP channel of block ``layer``."""
    mlp = model.blocks[layer].mlp
    fc = fc_rows_per_channel(mlp.fc.weight.detach().float(), model.cfg.ffn_size)  # (ffn, rows, C)
    return fc.pow(2).sum(dim=(1, 2)).sqrt() * mlp.proj.weight.detach().float().norm(dim=0)


def fc_rows_per_channel(t: torch.Tensor, ffn: int) -> torch.Tensor:
    """The MLP input projection's rows (or bias) grouped by the channel they feed: (ffn, 1, ...),
    or (ffn, 2, ...) for SwiGLU, whose fc holds the gate's rows then the value's."""
    return t.view(-1, ffn, *t.shape[1:]).transpose(0, 1)


def weight_scores(model: GPT) -> Scores:
    return [(head_importance(model, i), channel_importance(model, i)) for i in range(model.cfg.n_layer)]


def _taylor_terms(model: GPT, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This batch's ``|w * dL/dw|`` summed per head and per channel of block ``layer``."""
    cfg = model.cfg
    nh, hs = cfg.n_head, cfg.head_size
    attn, mlp = model.blocks[layer].attn, model.blocks[layer].mlp

    def saliency(p: torch.nn.Parameter | None) -> torch.Tensor | None:
        if p is None or p.grad is None:
            return None
        return (p.detach().float() * p.grad.float()).abs()

    heads = torch.zeros(nh)
    channels = torch.zeros(cfg.ffn_size)
    if (s := saliency(attn.qkv.weight)) is not None:
        heads += s.view(3, nh, hs, -1).sum(dim=(0, 2, 3))
    if (s := saliency(attn.qkv.bias)) is not None:
        heads += s.view(3, nh, hs).sum(dim=(0, 2))
    if (s := saliency(attn.proj.weight)) is not None:
        heads += s.view(-1, nh, hs).sum(dim=(0, 2))
    if (s := saliency(mlp.fc.weight)) is not None:
        channels += fc_rows_per_channel(s, cfg.ffn_size).sum(dim=(1, 2))
    if (s := saliency(mlp.fc.bias)) is not None:
        channels += fc_rows_per_channel(s, cfg.ffn_size).sum(dim=1)
    if (s := saliency(mlp.proj.weight)) is not None:
        channels += s.sum(dim=0)
    return heads, channels


def taylor_scores(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """Taylor importance summed over ``batches`` of (inputs, targets); the model's weights are
    unchanged (its gradients are cleared afterwards)."""
    cfg = model.cfg
    scores = [(torch.zeros(cfg.n_head), torch.zeros(cfg.ffn_size)) for _ in range(cfg.n_layer)]
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()  # no dropout: the score of the model as it will run
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                _, loss = model(x, y)
                loss.backward()
                for i, (h, c) in enumerate(scores):
                    dh, dc = _taylor_terms(model, i)
                    h += dh
                    c += dc
    finally:
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return scores


def activation_scores(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """Mean |activation| of each head and channel over ``batches`` of (inputs, targets)."""
    cfg = model.cfg
    nh, hs = cfg.n_head, cfg.head_size
    sums = [[torch.zeros(nh), torch.zeros(cfg.ffn_size)] for _ in range(cfg.n_layer)]
    tokens = 0

    def hook(layer: int, which: int):
        def record(_module, args):
            a = args[0].detach().float().abs().reshape(-1, args[0].size(-1))  # (tokens, width)
            sums[layer][which] += (a.view(-1, nh, hs).mean(dim=2) if which == 0 else a).sum(dim=0)
        return record

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.proj.register_forward_pre_hook(hook(i, 0)))
        handles.append(block.mlp.proj.register_forward_pre_hook(hook(i, 1)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
                tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(h / max(tokens, 1), c / max(tokens, 1)) for h, c in sums]


def calibration_batches(data: str | Path, seq_len: int, batch: int, n_batches: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches`` batches of ``batch`` windows of ``seq_len`` tokens of the train
    split of the token shards ``data``: (inputs, targets)."""
    from pilelm.tokens.shards import open_split
    from pilelm.training.loader import eval_batches

    tokens = open_split(data, "train").dataset.tokens
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{data}: the train split has {len(tokens)} tokens, fewer than one calibration window "
                         f"of {seq_len + 1}; lower calibration_seq_len")
    return [(x, y) for x, y, _ in eval_batches(tokens, seq_len, batch, max_windows=batch * n_batches)]


def importance_scores(model: GPT, how: str, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> Scores:
    """Per-block (head, channel) scores of ``how`` (one of ``IMPORTANCE``)."""
    if how == "weight":
        return weight_scores(model)
    if not batches:
        raise ValueError(f"importance={how} needs calibration batches: --data SHARD_DIR")
    model_dtype = next(model.parameters()).dtype
    model.float()  # scores in fp32 (a bf16 run's gradients are too coarse to rank by)
    try:
        return taylor_scores(model, batches) if how == "taylor" else activation_scores(model, batches)
    finally:
        model.to(model_dtype)

