"""`pilelm prune RUN -o PRUNED`: magnitude (unstructured) or structured pruning of a GPT.

- ``magnitude``: the ``sparsity`` fraction of smallest-magnitude weights of the linear layers
  set to zero, by one threshold over all of them (``scope=global``) or one per layer
  (``scope=layer``); Han et al. 2015. The model keeps its shape (and its speed: dense kernels
  do not skip zeros); it compresses well and shows what the weights can lose.
- ``structured``: whole attention heads and MLP channels removed, the same number in every
  block (so the model stays a plain ``GPTConfig``: fewer ``n_head`` of unchanged ``head_dim``,
  smaller ``d_ff``), choosing in each block the ones of least importance (``--importance``:
  the data-free weight norms, or the Taylor or mean-activation scores on a few calibration
  batches of ``--data``; ``compress/importance.py``). The result is a genuinely smaller dense
  model that decodes faster.

Removing heads leaves ``n_head * head_dim < d_model``, which transformers' GPT-2 and
GPT-NeoX cannot express: such runs do not export (``pilelm export`` says so); pruning MLP
channels only (``heads=0``) keeps a run exportable. Runs of the cpu-10min recipe's form export
as Qwen3 (or Llama), whose ``head_dim`` is free, so they export either way. A SwiGLU MLP loses
a channel's gate and value rows together. ``recovery_steps`` fine-tunes the pruned
model afterwards (``compress/recovery.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from pilelm.compress.derived_run import write_derived_run
from pilelm.compress.importance import (
    IMPORTANCE,
    NEEDS_DATA,
    Importance,
    Scores,
    calibration_batches,
    importance_scores,
)
from pilelm.core.config import to_dict
from pilelm.core.manifest import MANIFEST, Timer, read_manifest, write_manifest
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training.checkpoint import load_for_inference
from pilelm.training.resume import discard_run

log = logging.getLogger(__name__)

PRUNED = "pruned"
"""With a recovery fine-tune: the folder of OUTPUT holding the pruned model before it."""


@dataclass
class PruneConfig:
    run: str = ""
    """Run directory to prune (pilelm train / import output)."""
    output: str = ""
    """Run directory to write (-o)."""
    method: Literal["magnitude", "structured"] = "structured"
    """magnitude: zero the smallest weights (same shape); structured: remove heads and MLP channels (a smaller model)."""
    sparsity: float = 0.5
    """magnitude: fraction of linear-layer weights set to zero."""
    scope: Literal["global", "layer"] = "global"
    """magnitude: one threshold over all linear layers (global) or the same fraction in each (layer)."""
    heads: float = 0.5
    """structured: fraction of each block's attention heads removed (0 keeps them all, and the run exportable)."""
    channels: float = 0.5
    """structured: fraction of each block's MLP channels removed."""
    importance: Importance = "weight"
    """structured: how heads and channels are ranked: weight (norms, no data), taylor (sum |w * dL/dw| on calibration batches of --data) or activation (mean |activation| on them)."""
    calibration_batches: int = 4
    """taylor / activation: batches of the train split of --data scored."""
    calibration_batch_size: int = 8
    """taylor / activation: windows per calibration batch."""
    calibration_seq_len: int = 256
    """taylor / activation: tokens per calibration window (at most the model's block_size)."""
    step: int | None = None
    """Checkpoint step to prune; None = the latest."""
    recovery_steps: int = 0
    """Fine-tune the pruned model this many steps on --data afterwards (0 = none); magnitude-pruned zeros stay zero."""
    data: str = ""
    """Token shards (tokenized with the run's tokenizer) of the recovery fine-tune and of taylor / activation calibration."""
    recovery_lr: float = 3e-4
    """Peak learning rate of the recovery fine-tune (AdamW, short warmup, cosine)."""
    recovery_micro_batch: int = 8
    """Sequences (of the model's block_size) per recovery step."""

    def __post_init__(self) -> None:
        for key in ("sparsity", "heads", "channels"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.recovery_steps < 0 or self.recovery_micro_batch < 1 or self.recovery_lr <= 0:
            raise ValueError("recovery_steps must be >= 0, recovery_micro_batch >= 1 and recovery_lr > 0")
        if self.recovery_steps and not self.data:
            raise ValueError("recovery_steps needs the token shards to fine-tune on: --data SHARD_DIR")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.importance in NEEDS_DATA and not self.data:
            raise ValueError(f"importance={self.importance} scores heads and channels on calibration batches: "
                             "give the token shards with --data SHARD_DIR (or use importance=weight)")
        if self.importance != "weight" and self.method != "structured":
            raise ValueError(f"importance={self.importance} ranks heads and channels for method=structured; "
                             "magnitude pruning ranks single weights by |w|")
        if min(self.calibration_batches, self.calibration_batch_size, self.calibration_seq_len) < 1:
            raise ValueError("calibration_batches, calibration_batch_size and calibration_seq_len must be >= 1")


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The prunable matrices: every linear layer but an output projection tied to the embedding."""
    tied = getattr(getattr(model, "cfg", None), "tied", False)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (tied and n == "lm_head")]


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> float:
    """Zero the smallest-|w| fraction ``sparsity`` of the linear weights in place; returns the
    fraction actually zero."""
    layers = _linear_layers(model)
    with torch.no_grad():
        if scope == "global":
            mags = torch.cat([m.weight.detach().abs().flatten().float() for _, m in layers])
            k = int(sparsity * mags.numel())
            threshold = mags.kthvalue(k).values if k else None
            for _, m in layers:
                if threshold is not None:
                    m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        else:
            for _, m in layers:
                k = int(sparsity * m.weight.numel())
                if k:
                    threshold = m.weight.detach().abs().flatten().float().kthvalue(k).values
                    m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / sum(m.weight.numel() for _, m in layers)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    return scores.topk(n_keep).indices.sort().values


def structured_prune(model: GPT, heads: float, channels: float, scores: Scores | None = None) -> GPT:
    """A new, smaller GPT without the least important ``heads`` fraction of heads and
    ``channels`` fraction of MLP channels of every block; all else copied. ``scores`` (per
    block: head scores, channel scores; ``compress/importance.py``) default to the weight norms."""
    cfg = model.cfg
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"structured pruning is for GPT models, not {type(cfg).__name__}: transformers' BERT "
                         "cannot express blocks with pruned heads of other widths; use --method magnitude")
    nh_keep = cfg.n_head - int(heads * cfg.n_head)
    ff_keep = cfg.ffn_size - int(channels * cfg.ffn_size)
    if nh_keep < 1 or ff_keep < 1:
        raise ValueError("pruning would remove every head or channel; lower heads / channels")
    if scores is None:
        scores = importance_scores(model, "weight")
    hs = cfg.head_size
    new_cfg = replace(cfg, n_head=nh_keep, head_dim=hs, d_ff=ff_keep)
    if new_cfg.attn_width == cfg.d_model:
        new_cfg = replace(new_cfg, head_dim=0)
    pruned = GPT(new_cfg)
    state = {k: v for k, v in model.state_dict().items()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        kept_heads = keep_top(scores[i][0], nh_keep)
        rows = (kept_heads[:, None] * hs + torch.arange(hs)).flatten()  # kept rows of one of q, k, v
        qkv_rows = torch.cat([rows + j * cfg.attn_width for j in range(3)])
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][qkv_rows]
        state[p + "attn.proj.weight"] = state[p + "attn.proj.weight"][:, rows]
        kept = keep_top(scores[i][1], ff_keep)
        fc_rows = torch.cat([kept + j * cfg.ffn_size for j in range(2 if cfg.mlp == "swiglu" else 1)])
        state[p + "mlp.fc.weight"] = state[p + "mlp.fc.weight"][fc_rows]
        state[p + "mlp.proj.weight"] = state[p + "mlp.proj.weight"][:, kept]
        if cfg.bias:
            state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][qkv_rows]
            state[p + "mlp.fc.bias"] = state[p + "mlp.fc.bias"][fc_rows]
    pruned.load_state_dict(state)
    return pruned.to(next(model.parameters()).dtype).eval()


def run_prune(cfg: PruneConfig) -> Path:
    """Prune into ``cfg.output``; with ``recovery_steps`` the pruned model is a run of its own in
    ``OUTPUT/pruned/`` and the output run is the fine-tuned one (rerunning resumes the fine-tune)."""
    if not cfg.run or not cfg.output:
        raise ValueError("prune needs a run and an output: pilelm prune RUN_DIR -o PRUNED_DIR")
    out = Path(cfg.output)
    if not cfg.recovery_steps:
        return _prune(cfg)
    pruned_dir = out / PRUNED
    # The pruning stage proper: no fine-tune (its data only when it ranks by calibration batches).
    pruning = replace(cfg, output=str(pruned_dir), recovery_steps=0, data=cfg.data if cfg.importance in NEEDS_DATA else "")
    if not _made_by(pruned_dir, pruning):  # a rerun after a kill keeps the pruned run and its fine-tune
        discard_run(out, "another pruned model")  # a fine-tune of another pruning must not resume
        _prune(pruning)
    from pilelm.compress.recovery import Recovery, recover
    from pilelm.training.trainer import ManifestEntry

    masked = []
    if cfg.method == "magnitude":
        model, _, _ = load_for_inference(pruned_dir)
        masked = [f"{name}.weight" for name, _ in _linear_layers(model)]
    entry = ManifestEntry("prune", cfg, [cfg.run, cfg.data], read_manifest(pruned_dir)["counts"])
    return recover(Recovery(init_from=pruned_dir, output=out, data=cfg.data, steps=cfg.recovery_steps,
                            lr=cfg.recovery_lr, micro_batch=cfg.recovery_micro_batch, masked=masked,
                            manifest=entry))


def _made_by(run: Path, cfg: PruneConfig) -> bool:
    """Whether ``run`` is a finished pruning with the config ``cfg``."""
    if not (run / MANIFEST).is_file():
        return False
    return read_manifest(run)["config"] == json.loads(json.dumps(to_dict(cfg), default=str))


def _scores(cfg: PruneConfig, model: nn.Module, tok_dir: Path) -> Scores | None:
    """The importance scores ``cfg.importance`` ranks by (None: structured_prune's default)."""
    if cfg.importance not in NEEDS_DATA or not isinstance(model, GPT):
        return None
    from pilelm.tokens.identity import require_same_tokenizer

    require_same_tokenizer(tok_dir, cfg.data, what=f"prune importance={cfg.importance}")
    seq_len = min(cfg.calibration_seq_len, model.cfg.block_size)
    batches = calibration_batches(cfg.data, seq_len, cfg.calibration_batch_size, cfg.calibration_batches)
    log.info("%s importance on %d calibration batches of %d x %d tokens", cfg.importance, len(batches),
             cfg.calibration_batch_size, seq_len)
    return importance_scores(model, cfg.importance, batches)


def _prune(cfg: PruneConfig) -> Path:
    timer = Timer()
    out = Path(cfg.output)
    with timer("prune"):
        model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step)
        n_before = sum(p.numel() for p in model.parameters())
        counts: dict[str, float | int] = {"parameters_before": n_before}
        if cfg.method == "magnitude":
            counts["zero_fraction"] = round(magnitude_prune(model, cfg.sparsity, cfg.scope), 4)
        else:
            model = structured_prune(model, cfg.heads, cfg.channels, _scores(cfg, model, tok_dir))
            model_cfg = model.cfg
        counts["parameters"] = sum(p.numel() for p in model.parameters())
        write_derived_run(cfg.run, cfg.step, out, model, model_cfg, tok_dir)
    write_manifest(out, "prune", cfg, inputs=[cfg.run], counts=counts, timings=timer.timings)
    log.info("pruned %s (%s): %d -> %d parameters, into %s", cfg.run, cfg.method, n_before, counts["parameters"], out)
    return out
