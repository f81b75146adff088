"""LoRA adapters on the trunk through ``peft`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

``add_lora`` injects adapters into the trunk's attention and MLP projections and freezes every
other trunk weight; the head stays fully trainable. Checkpoints for resuming keep the
adapters as they are; the model that is kept and exported has them merged
(``W + (alpha / r) B A``), so it loads and exports like a fully fine-tuned one. With
``lora.merge=false`` the kept checkpoint also holds the adapter apart (``save_adapter``:
``adapter.safetensors`` with the trunk's module names + ``adapter.json``), and ``pilelm export``
writes the base model and a peft adapter folder (``interop/peft_adapter.py``) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pilelm.core.atomic import atomic_path, atomic_write_json
from pilelm.finetune.config import LoraConfig

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"

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


def save_adapter(d: Path, model: nn.Module, cfg: LoraConfig) -> None:
    """Write the trunk's adapters into checkpoint folder ``d``: ``adapter.safetensors``
    (``{module}.lora_A.weight`` (r, in) and ``{module}.lora_B.weight`` (out, r), module names
    of the trunk without peft's wrapper) and ``adapter.json`` (r, alpha, scaling, modules)."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    trunk = getattr(model, "trunk", model)
    state: dict[str, torch.Tensor] = {}
    modules = []
    for name, module in trunk.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.active_adapters
            state[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight.detach().float().cpu().contiguous()
            state[f"{name}.lora_B.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
            modules.append(name)
    with atomic_path(Path(d) / ADAPTER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(Path(d) / ADAPTER_JSON, {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                                               "scaling": cfg.alpha / cfg.r, "modules": modules})


def read_adapter(d: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(adapter.json, adapter weights) of a checkpoint folder saved with lora.merge=false; None
    for one without an adapter apart."""
    import json

    from safetensors.torch import load_file

    d = Path(d)
    if not (d / ADAPTER_JSON).is_file():
        return None
    return json.loads((d / ADAPTER_JSON).read_text()), load_file(str(d / ADAPTER_WEIGHTS), device="cpu")


def unmerge(trunk: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Subtract the adapters' update ``scaling * B @ A`` from a merged trunk's weights in place,
    giving back the base the adapters were trained on (up to float32 rounding)."""
    modules = dict(trunk.named_modules())
    with torch.no_grad():
        for name in meta["modules"]:
            if name not in modules:
                raise ValueError(f"the adapter names module {name!r}, which the model does not have")
            w = modules[name].weight
            delta = (state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]) * meta["scaling"]
            w.copy_((w.float() - delta.to(w.device)).to(w.dtype))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
