"""A pretrained trunk (GPT-2, GPT-NeoX, BERT) with a classification head, saved and loaded.

Heads follow transformers' ``*ForSequenceClassification`` / ``*ForTokenClassification`` so the
export is exact (``pilelm/interop/heads.py``):

- sequence, ``pooling=last`` (GPT): the hidden state of the last non-pad token through a
  bias-free ``classifier`` (transformers' ``score``), as ``GPT2ForSequenceClassification``;
- sequence, ``pooling=cls`` (BERT): the [CLS] state through a tanh ``pooler`` then the
  classifier, as ``BertForSequenceClassification`` (the pooler starts from the pretrained NSP
  pooler when the model has one);
- sequence, ``pooling=mean``: the mean of the real tokens' states (no transformers class);
- token: a ``classifier`` over every position's hidden state (dropout first).

A fine-tuned checkpoint folder holds ``model.safetensors`` (``trunk.*`` and head weights),
``model.json`` (the trunk's family and config, as a training checkpoint has) and ``head.json``
(``HeadSpec``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file

from pilelm.core.atomic import atomic_write_json
from pilelm.models import build_model, config_from_spec, spec_for
from pilelm.models.dropout import Dropout
from pilelm.training.checkpoint import save_weights

HEAD_FILE = "head.json"
Pooling = Literal["auto", "last", "cls", "mean"]


@dataclass(frozen=True)
class HeadSpec:
    task: str
    """The task that trained it (classify, ner, punct, ...)."""
    kind: Literal["sequence", "token"]
    labels: tuple[str, ...]
    pooling: Literal["last", "cls", "mean", "none"]
    pad_id: int
    max_length: int
    """Tokens per example the model was trained on (truncation)."""
    scheme: str = ""
    """ner: bio or bioes."""

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


def resolve_pooling(pooling: Pooling, causal: bool) -> Literal["last", "cls", "mean"]:
    """auto: a causal model's last real token (the only one that has seen the whole text), an
    encoder's [CLS]."""
    if pooling == "auto":
        return "last" if causal else "cls"
    if pooling == "cls" and causal:
        raise ValueError("head.pooling=cls needs an encoder such as BERT ([CLS] is its first token); "
                         "a causal model uses last or mean")
    return pooling


class TaskModel(nn.Module):
    def __init__(self, trunk: nn.Module, head: HeadSpec, dropout: float):
        super().__init__()
        self.trunk = trunk
        self.head = head
        spec = spec_for(trunk.cfg)
        self.family, self.causal = spec.family, spec.causal
        width = trunk.cfg.d_model
        if head.kind == "sequence" and head.pooling == "cls":
            self.pooler = nn.Linear(width, width)
            source = getattr(trunk, "pooler", None)
            with torch.no_grad():
                if source is not None:
                    self.pooler.load_state_dict(source.state_dict())
                else:
                    nn.init.normal_(self.pooler.weight, std=trunk.cfg.init_std)
                    nn.init.zeros_(self.pooler.bias)
        self.drop = Dropout(dropout)
        # transformers' causal-LM sequence heads (``score``) have no bias; every other head has one.
        bias = not (head.kind == "sequence" and self.causal)
        self.classifier = nn.Linear(width, len(head.labels), bias=bias)
        with torch.no_grad():
            nn.init.normal_(self.classifier.weight, std=trunk.cfg.init_std)
            if bias:
                nn.init.zeros_(self.classifier.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, right-padded -> (B, T, C) final hidden states."""
        if self.causal:
            return self.trunk.encode(input_ids)  # right padding needs no mask: tokens never see later ones
        return self.trunk.encode(input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> logits (B, n_labels) for a sequence head, (B, T, n_labels) for a token head."""
        h = self.hidden(input_ids, attention_mask)
        if self.head.kind == "token":
            return self.classifier(self.drop(h))
        if self.head.pooling == "cls":
            pooled = torch.tanh(self.pooler(h[:, 0]))
        elif self.head.pooling == "last":
            last = attention_mask.sum(1) - 1  # right padding: the last real token
            pooled = h[torch.arange(h.size(0), device=h.device), last]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.classifier(self.drop(pooled))


def with_dropout(model_cfg: Any, dropout: float | None) -> Any:
    return model_cfg if dropout is None else replace(model_cfg, dropout=dropout)


def build_task_model(trunk_cfg: Any, head: HeadSpec, dropout: float, trunk_state: dict | None = None) -> TaskModel:
    trunk = build_model(with_dropout(trunk_cfg, dropout))
    if trunk_state is not None:
        trunk.load_state_dict(trunk_state)
    return TaskModel(trunk, head, dropout)


def save_task_model(ckpt_dir: str | Path, model: TaskModel, state: dict[str, torch.Tensor] | None = None) -> None:
    """model.safetensors + model.json (the trunk) + head.json, each written atomically."""
    ckpt_dir = Path(ckpt_dir)
    save_weights(ckpt_dir, state if state is not None else model.state_dict(), model.trunk.cfg)
    atomic_write_json(ckpt_dir / HEAD_FILE, asdict(model.head))


def read_head(ckpt_dir: str | Path) -> HeadSpec:
    raw = json.loads((Path(ckpt_dir) / HEAD_FILE).read_text())
    raw["labels"] = tuple(raw["labels"])
    return HeadSpec(**raw)


def load_task_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """The fine-tuned model of a checkpoint folder, in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    trunk_cfg = config_from_spec(json.loads((ckpt_dir / "model.json").read_text()))
    head = read_head(ckpt_dir)
    model = build_task_model(trunk_cfg, head, 0.0)
    state = load_file(str(ckpt_dir / "model.safetensors"), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if not any(params.get(k) is params.get(s) for s in state)]
    if untied or unexpected:
        raise ValueError(f"{ckpt_dir}: weights do not match the model: missing {untied}, unexpected {unexpected}")
    return model.to(device).eval()
