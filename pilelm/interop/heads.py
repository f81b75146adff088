"""How a fine-tuned model (``pilelm finetune`` output) maps to a transformers task model
(``pilelm export FT_DIR``: ``hf.run_export`` writes the folder).

The trunk maps as the family's language model does (``hf.ADAPTERS``); the language-model
head is dropped and the task head added under transformers' names:

| trunk | sequence head | token head |
|---|---|---|
| GPT-2 | ``GPT2ForSequenceClassification``: ``score`` (no bias) on the last non-pad token | ``GPT2ForTokenClassification``: ``classifier`` |
| GPT-NeoX | ``GPTNeoXForSequenceClassification``: ``score`` | ``GPTNeoXForTokenClassification``: ``classifier`` |
| Llama / Qwen3 | ``{Llama,Qwen3}ForSequenceClassification``: ``score`` | ``{Llama,Qwen3}ForTokenClassification``: ``score`` (with bias) |
| BERT | ``BertForSequenceClassification``: ``bert.pooler.dense`` + ``classifier`` | ``BertForTokenClassification``: ``classifier`` |

``config.json`` carries ``id2label`` / ``label2id`` and ``pad_token_id`` (transformers' GPT
sequence classifiers find the last real token by it), so
``AutoModelFor{Sequence,Token}Classification.from_pretrained(folder)`` gives pilelm's logits.
Mean pooling has no transformers class and is refused.
"""

from __future__ import annotations

import torch

# The language model's transformers class -> (task class prefix, the trunk's key prefix in HF
# state dicts, the token head's name).
_PREFIX = {"GPT2LMHeadModel": ("GPT2", "transformer.", "classifier"),
           "GPTNeoXForCausalLM": ("GPTNeoX", "gpt_neox.", "classifier"),
           "LlamaForCausalLM": ("Llama", "model.", "score"), "Qwen3ForCausalLM": ("Qwen3", "model.", "score"),
           "BertForMaskedLM": ("Bert", "bert.", "classifier"), "BertForPreTraining": ("Bert", "bert.", "classifier")}


def head_architecture(model: torch.nn.Module, lm_architecture: str) -> tuple[str, str, str]:
    """(transformers architecture name, trunk key prefix, token head name) of a TaskModel whose
    trunk exports as ``lm_architecture``."""
    name, prefix, token_head = _PREFIX[lm_architecture]
    kind = "Sequence" if model.head.kind == "sequence" else "Token"
    return f"{name}For{kind}Classification", prefix, token_head


def task_model_to_hf(model: torch.nn.Module, lm_state: dict[str, torch.Tensor],
                     lm_architecture: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, HF state dict) of a TaskModel, given the HF state dict of its trunk as
    the family's language model (``hf.export_state``) and that model's transformers class."""
    if model.head.pooling == "mean":
        raise ValueError("a mean-pooled head has no transformers class; fine-tune with head.pooling=auto "
                         "(last for GPT, cls for BERT) to export it")
    architecture, prefix, token_head = head_architecture(model, lm_architecture)
    # Keep the trunk; the masked-LM / NSP heads, the LM head and a pretraining pooler go.
    state = {k: v for k, v in lm_state.items() if k.startswith(prefix) and not k.startswith(prefix + "pooler.")}
    if model.head.kind == "sequence" and model.family == "gpt":
        state["score.weight"] = model.classifier.weight
    else:
        state[f"{token_head}.weight"] = model.classifier.weight
        state[f"{token_head}.bias"] = model.classifier.bias
    if model.head.pooling == "cls":
        state["bert.pooler.dense.weight"] = model.pooler.weight
        state["bert.pooler.dense.bias"] = model.pooler.bias
    return architecture, {k: v.detach().contiguous() for k, v in state.items()}
