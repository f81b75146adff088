"""A LoRA fine-tune kept apart (``pilelm finetune ... lora.r=8 lora.merge=false``) -> a ``peft``
adapter folder beside the exported base model (``pilelm export FT_DIR --format hf -o OUT``
writes ``OUT/adapter/``).

The adapter's modules get transformers' names through the family's weight map
(``interop/gpt2_neox.py``, ``interop/llama_qwen3.py``): ``lora_A`` (r, in) is copied, and
``lora_B`` (out, r) takes the row transform of the weight it adapts: none for GPT-2's
``Conv1D`` layers (peft keeps A and B as for a Linear and transposes their product:
``fan_in_fan_out=True``), NeoX's per-head (nh, 3, hs) order for ``query_key_value``, and
Llama / Qwen3's split of our fused ``qkv`` / SwiGLU ``fc`` into ``q/k/v_proj`` /
``gate/up_proj`` (each part shares ``lora_A`` and takes its rows of ``lora_B``). So
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT / "adapter")``
computes pilelm's fine-tuned model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pilelm.core.atomic import atomic_path
from pilelm.interop import gpt2_neox, llama_qwen3
from pilelm.models.gpt import GPTConfig

ADAPTER_DIR = "adapter"
"""The peft adapter's folder inside the exported one."""


def _module_rows(cfg: GPTConfig) -> dict[str, list[tuple[str, str]]]:
    """Our module -> [(transformers module, lora_B row transform)]."""
    rows = llama_qwen3._weight_map(cfg) if cfg.norm == "rmsnorm" else gpt2_neox._weight_map(cfg)
    out: dict[str, list[tuple[str, str]]] = {}
    for ours, theirs, how in rows:
        if ours.endswith(".weight") and theirs.endswith(".weight"):
            out.setdefault(ours[: -len(".weight")], []).append((theirs[: -len(".weight")], how))
    return out


def peft_state(cfg: Any, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(peft's adapter_model state dict, target module names) of pilelm's adapter
    (``finetune/lora.py``: ``read_adapter``) on a trunk of config ``cfg``."""
    if not isinstance(cfg, GPTConfig):
        raise ValueError("a LoRA adapter exports apart for GPT trunks (GPT-2, GPT-NeoX, Llama, Qwen3) only; "
                         "fine-tune this model with lora.merge=true to export it merged")
    rows = _module_rows(cfg)
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for module in meta["modules"]:
        if module not in rows:
            raise ValueError(f"the adapter on {module!r} has no transformers counterpart; "
                             "fine-tune with the default lora.targets or lora.merge=true")
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        for theirs, how in rows[module]:
            part = b
            if how == "qkv":
                part = gpt2_neox._qkv_to_hf(b, cfg.n_head)
            elif "/" in how:
                i, n = map(int, how.split("/"))
                part = b.chunk(n, dim=0)[i]
            out[f"base_model.model.{theirs}.lora_A.weight"] = a.clone()  # q/k/v share it: a copy each
            out[f"base_model.model.{theirs}.lora_B.weight"] = part.clone()
            targets.append(theirs)
    return out, targets


def write_peft_adapter(folder: Path, cfg: Any, meta: dict[str, Any], state: dict[str, torch.Tensor],
                       task_type: str | None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format under ``folder``;
    ``task_type`` is peft's (CAUSAL_LM for a language model; None for a task model, whose
    exported base already holds the trained head)."""
    from peft import LoraConfig

    hf_state, targets = peft_state(cfg, meta, state)
    peft_cfg = LoraConfig(r=meta["r"], lora_alpha=meta["alpha"], lora_dropout=meta["dropout"], target_modules=targets,
                          fan_in_fan_out=cfg.arch == "gpt2" and cfg.norm != "rmsnorm", bias="none",
                          task_type=task_type)
    folder.mkdir(parents=True, exist_ok=True)
    peft_cfg.save_pretrained(str(folder))
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(hf_state, str(tmp), metadata={"format": "pt"})
    return folder
