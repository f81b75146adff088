"""How a fine-tuned model (``pilelm finetune`` output) maps to a transformers task model
(``pilelm export FT_DIR``: ``hf.run_export`` writes the folder).

The trunk maps as the family's language model does (``hf.ADAPTERS``); the language-model
head is dropped and the task head added under transformers' names:

| trunk | sequence head | token head |
|---|---|---|
| GPT-2 | ``GPT2ForSequenceClassification``: ``score`` (no bias) on the last non-pad token | ``GPT2ForTokenClassification``: ``classifier`` |
| GPT-NeoX | ``GPTNeoXForSequenceClassification``: ``score`` | ``GPTNeoXForTokenClassification``: ``classifier`` |
| BERT | ``BertForSequenceClassification``: ``bert.pooler.dense`` + ``classifier`` | ``BertForTokenClassification``: ``classifier`` |

``config.json`` carries ``id2label`` / ``label2id`` and ``pad_token_id`` (transformers' GPT
sequence classifiers find the last real token by it), so
``AutoModelFor{Sequence,Token}Classification.from_pretrained(folder)`` gives pilelm's logits.
Mean pooling has no transformers class and is refused.
"""

from __future__ import annotations

import torch

# (family, arch) -> (transformers class prefix, the trunk's key prefix in HF state dicts)
_PREFIX = {("gpt", "gpt2"): ("GPT2", "transformer."), ("gpt", "neox"): ("GPTNeoX", "gpt_neox."),
           ("bert", ""): ("Bert", "bert.")}


def head_architecture(model: torch.nn.Module) -> tuple[str, str]:
    """(transformers architecture name, trunk key prefix) of a TaskModel."""
    arch = getattr(model.trunk.cfg, "arch", "")
    name, prefix = _PREFIX[(model.family, arch)]
    kind = "Sequence" if model.head.kind == "sequence" else "Token"
    return f"{name}For{kind}Classification", prefix


def task_model_to_hf(model: torch.nn.Module, lm_state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, HF state dict) of a TaskModel, given the HF state dict of its trunk as
    the family's language model (``hf.export_state``)."""
    if model.head.pooling == "mean":
        raise ValueError("a mean-pooled head has no transformers class; fine-tune with head.pooling=auto "
                         "(last for GPT, cls for BERT) to export it")
    architecture, prefix = head_architecture(model)
    # Keep the trunk; the masked-LM / NSP heads, the LM head and a pretraining pooler go.
    state = {k: v for k, v in lm_state.items() if k.startswith(prefix) and not k.startswith(prefix + "pooler.")}
    if model.head.kind == "sequence" and model.family == "gpt":
        state["score.weight"] = model.classifier.weight
    else:
        state["classifier.weight"] = model.classifier.weight
        state["classifier.bias"] = model.classifier.bias
    if model.head.pooling == "cls":
        state["bert.pooler.dense.weight"] = model.pooler.weight
        state["bert.pooler.dense.bias"] = model.pooler.bias
    return architecture, {k: v.detach().contiguous() for k, v in state.items()}
