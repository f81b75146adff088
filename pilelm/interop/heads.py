"""Export a fine-tuned model (``pilelm finetune`` output) as a transformers task model.

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

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from pilelm.core.manifest import Timer, atomic_path, atomic_write_text, require_stage, write_manifest
from pilelm.models.dtypes import DTYPES

log = logging.getLogger(__name__)

# (family, arch) -> (transformers class prefix, the trunk's key prefix in HF state dicts)
_PREFIX = {("gpt", "gpt2"): ("GPT2", "transformer."), ("gpt", "neox"): ("GPTNeoX", "gpt_neox."),
           ("bert", ""): ("Bert", "bert.")}


def head_architecture(model: torch.nn.Module) -> tuple[str, str]:
    """(transformers architecture name, trunk key prefix) of a TaskModel."""
    arch = getattr(model.trunk.cfg, "arch", "")
    name, prefix = _PREFIX[(model.family, arch)]
    kind = "Sequence" if model.head.kind == "sequence" else "Token"
    return f"{name}For{kind}Classification", prefix


def task_model_to_hf(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, HF state dict) of a TaskModel."""
    from pilelm.interop.hf import export_state

    if model.head.pooling == "mean":
        raise ValueError("a mean-pooled head has no transformers class; fine-tune with head.pooling=auto "
                         "(last for GPT, cls for BERT) to export it")
    architecture, prefix = head_architecture(model)
    _, lm_state = export_state(model.trunk, model.trunk.cfg)
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


def export_finetuned(cfg: object) -> Path:
    """``pilelm export FT_DIR --format hf -o HF_DIR`` for a fine-tuned directory (its best checkpoint)."""
    from pilelm.finetune.model import load_task_model
    from pilelm.interop.hf import _export_tokenizer, adapter_of

    ft_dir, out = Path(cfg.run), Path(cfg.output)
    require_stage(ft_dir, "finetune", what="fine-tuned model")
    timer = Timer()
    with timer("export"):
        model = load_task_model(ft_dir / "best")
        architecture, state = task_model_to_hf(model)
        dtype = DTYPES[cfg.dtype]
        state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        out.mkdir(parents=True, exist_ok=True)
        bos, eos = _export_tokenizer(ft_dir / "tokenizer", out)
        hf_cfg = adapter_of(model.trunk.cfg).hf_config(model.trunk.cfg, bos, eos, cfg.dtype)
        hf_cfg.architectures = [architecture]
        hf_cfg.id2label = model.head.id2label
        hf_cfg.label2id = {label: i for i, label in model.head.id2label.items()}
        hf_cfg.pad_token_id = model.head.pad_id
        if model.head.kind == "sequence":
            hf_cfg.problem_type = "single_label_classification"
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out / "config.json", hf_cfg.to_json_string())
    n_params = sum(v.numel() for v in state.values())
    write_manifest(out, "export", cfg, inputs=[ft_dir], counts={"parameters": n_params}, timings=timer.timings,
                   extra={"architectures": [architecture], "task": model.head.task})
    log.info("exported %s (%s, %d labels) to %s", ft_dir, architecture, len(model.head.labels), out)
    return out
