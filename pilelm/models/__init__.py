"""Model families: name -> (config class, module class).

A saved model is ``model.safetensors`` + ``model.json`` = {"family": NAME, "config": {...}}.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from pilelm.core.config import from_dict, to_dict
from pilelm.models.gpt import GPT, GPTConfig

MODEL_FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
}


def register_family(name: str, config_cls: type, model_cls: type[nn.Module]) -> None:
    MODEL_FAMILIES[name] = (config_cls, model_cls)


def family_of(cfg: Any) -> str:
    for name, (config_cls, _) in MODEL_FAMILIES.items():
        if isinstance(cfg, config_cls):
            return name
    raise TypeError(f"no model family has config type {type(cfg).__name__}")


def build_model(cfg: Any) -> nn.Module:
    return MODEL_FAMILIES[family_of(cfg)][1](cfg)


def model_spec(cfg: Any) -> dict[str, Any]:
    """The JSON that describes a model: its family and config."""
    return {"family": family_of(cfg), "config": to_dict(cfg)}


def config_from_spec(spec: dict[str, Any]) -> Any:
    family = spec.get("family")
    if family not in MODEL_FAMILIES:
        _load_optional_families()
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(MODEL_FAMILIES)}")
    return from_dict(MODEL_FAMILIES[family][0], spec["config"])


def _load_optional_families() -> None:
    try:  # the encoder family registers itself on import
        import pilelm.models.bert  # noqa: F401
    except ImportError:
        pass
