"""The shipped model families, registered explicitly: one ``ModelSpec`` each.

A new family needs none of this file: it is a folder ``pilelm/models/NAME/`` whose
``__init__.py`` registers its ``ModelSpec`` (config class, module, objective, config section,
Hugging Face adapter module), and the train config takes its section from the registry.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from pilelm.models.bert import Bert, BertConfig
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.models.spec import IGNORE_INDEX, Batch, ModelSpec, register

# --- gpt: GPT-2 / GPT-NeoX causal LM ----------------------------------------------------------


def _causal_train_kwargs(batch: Batch, counts: tuple[float, float], fused_loss: bool) -> dict[str, Any]:
    # Without logits the loss is computed chunk by chunk (models/fused_ce.py).
    return {"return_logits": False} if fused_loss else {}


def _causal_eval_loss(model: nn.Module, batch: Batch) -> tuple[float, float]:
    targets = batch["labels"]
    _, loss = model(batch["input_ids"], targets, return_logits=False)
    return float(loss) * targets.numel(), float(targets.numel())


GPT_SPEC = register(ModelSpec(
    family="gpt",
    config_cls=GPTConfig,
    model_cls=GPT,
    config_section="model",
    objective=lambda cfg: "clm",
    needs_special_tokens=False,
    loss_normalisation="micro_batch_mean",
    train_kwargs=_causal_train_kwargs,
    eval_loss=_causal_eval_loss,
    hf_adapter="pilelm.interop.gpt2_neox",
    causal=True,
    gguf_adapter="pilelm.interop.gguf_gpt",
))


# --- bert: masked LM (+ next-sentence prediction) ----------------------------------------------

_ENCODER_INPUTS = ("token_type_ids", "attention_mask")


def _masked_train_kwargs(batch: Batch, counts: tuple[float, float], fused_loss: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_targets": counts[0], "num_pairs": counts[1]}
    for key in (*_ENCODER_INPUTS, "next_sentence_label"):
        if key in batch:
            kw[key] = batch[key]
    return kw


def _masked_eval_loss(model: nn.Module, batch: Batch) -> tuple[float, float]:
    count = float((batch["labels"] != IGNORE_INDEX).sum())
    kw = {k: batch[k] for k in _ENCODER_INPUTS if k in batch}
    _, loss = model(batch["input_ids"], batch["labels"], num_targets=1.0, **kw)  # the summed loss
    return float(loss), count


BERT_SPEC = register(ModelSpec(
    family="bert",
    config_cls=BertConfig,
    model_cls=Bert,
    config_section="bert",
    objective=lambda cfg: "mlm+nsp" if cfg.nsp else "mlm",
    needs_special_tokens=True,
    loss_normalisation="global_target_count",
    train_kwargs=_masked_train_kwargs,
    eval_loss=_masked_eval_loss,
    hf_adapter="pilelm.interop.bert",
    causal=False,
))
