"""LoRA adapters on the trunk through ``peft`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

``add_lora`` injects adapters into the trunk's attention and MLP projections and freezes every
other trunk weight; the head stays fully trainable. Checkpoints for resuming keep the
adapters as they are; the model that is kept and exported has them merged
(``W + (alpha / r) B A``), so it loads and exports like a fully fine-tuned one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pilelm.finetune.config import LoraConfig

# The projections of each family's blocks (pilelm/models/gpt.py and bert.py module names).
DEFAULT_TARGETS = {
    "gpt": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"],
    "bert": ["qkv", "proj", "fc", "fc_out"],
}


def add_lora(model: nn.Module, family: str, cfg: LoraConfig) -> None:
    """Inject adapters into ``model.trunk`` (a task model's; else the model itself) in place
    and freeze the trunk's own weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = list(cfg.targets) or DEFAULT_TARGETS[family]
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    trunk = getattr(model, "trunk", model)
    inject_adapter_in_model(peft_cfg, trunk)
    for name, p in trunk.named_parameters():
        p.requires_grad = "lora_" in name


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight, under the names
    the model has without adapters."""
    from peft.tuners.lora import LoraLayer

    out = {k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                out[f"{name}.weight"] = (base.weight + delta).detach()
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
