"""One ``ModelSpec`` per model family: everything the rest of pilelm needs to know about it.

The idea is torchtitan's ``TrainSpec``: a family's knowledge lives in one object that the
trainer, the exporter and the stages that load models ask, instead of ``family ==`` branches
spread over them. A spec names the config and module classes, the training objective (the
loader collates batches for it), how the loss of a global batch is normalised, the model
keyword arguments of a training step, the validation step, and the Hugging Face adapter (a
module path, imported lazily: models/ never imports interop/).

The shipped families are registered explicitly in ``pilelm/models/families.py``; a family
that is a folder ``pilelm/models/NAME/`` registers itself in its ``__init__.py``, which
``pilelm.models`` imports. The family's ``config_section`` becomes a section of the train
config (``training/config.py`` builds one per registered family).

A saved model is ``model.safetensors`` + ``model.json`` = {"family": NAME, "config": {...}}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from pilelm.core.config import from_dict, to_dict

IGNORE_INDEX = -100
"""Label of a position without a target (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

Objective = Literal["clm", "mlm", "mlm+nsp"]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How one model family is configured, built, trained, validated and converted."""

    family: str
    """Its name in ``model.json`` and in the train config's ``family`` key."""
    config_cls: type
    """The typed config dataclass of the family."""
    model_cls: type[nn.Module]
    """The ``nn.Module`` built from a config; it has ``encode(input_ids, ...) -> (B, T, C)``."""
    config_section: str
    """The train-config section that holds the family's config (``model``, ``bert``); its field
    docs are that section's ``--help``."""
    objective: Callable[[Any], Objective]
    """config -> training objective, which names the loader's collation: clm (shifted windows),
    mlm (masked windows), mlm+nsp (masked sentence pairs with segments and padding)."""
    needs_special_tokens: bool
    """Whether the collation needs the tokenizer's [MASK] (and [CLS]/[SEP]/[PAD]) tokens."""
    loss_normalisation: Literal["micro_batch_mean", "global_target_count"]
    """micro_batch_mean: the model returns the mean loss of a micro-batch (every position is a
    target, so micro-batches weigh the same) and the trainer averages those; global_target_count:
    the trainer counts the targets (and pairs) of the whole global batch and the model divides
    its summed loss by those counts (masks are random: micro-batches hold different counts)."""
    train_kwargs: Callable[[Batch, tuple[float, float], bool], dict[str, Any]]
    """(micro-batch, global (target, pair) counts, fused_loss) -> keyword arguments of
    ``model(batch["input_ids"], batch["labels"], **kwargs)`` in a training step."""
    eval_loss: Callable[[nn.Module, Batch], tuple[float, float]]
    """(model, validation batch) -> (summed loss in nats, number of targets)."""
    hf_adapter: str
    """Module of the Hugging Face adapter (``pilelm.interop.*``; it defines ``ADAPTER``)."""
    causal: bool
    """A causal LM: generate, eval and serve can use it."""
    gguf_adapter: str = ""
    """Module that writes the family as a llama.cpp GGUF model (``pilelm.interop.gguf_*``:
    ``gguf_refusal``, ``gguf_arch``, ``gguf_hparams``, ``gguf_tensors``); empty: no llama.cpp form."""

    def build(self, cfg: Any) -> nn.Module:
        return self.model_cls(cfg)


_SPECS: dict[str, ModelSpec] = {}
_CLOSED_BY = ""
"""Who read the registry to build something that cannot grow (the train config's sections)."""


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family: ``pilelm/models/families.py`` registers the shipped ones; a family folder
    ``pilelm/models/NAME/`` registers its own when ``pilelm.models`` imports it."""
    if spec.family in _SPECS and _SPECS[spec.family] is not spec:
        raise ValueError(f"model family {spec.family!r} is already registered")
    if spec.family not in _SPECS and _CLOSED_BY:
        raise RuntimeError(f"model family {spec.family!r} is registered too late: {_CLOSED_BY} from the "
                           f"families registered then ({', '.join(_SPECS)}); register it before importing "
                           "pilelm.training (a folder under pilelm/models/ is imported with pilelm.models)")
    taken = {s.config_section: s.family for s in _SPECS.values() if s.family != spec.family}
    if spec.config_section in taken:
        raise ValueError(f"model family {spec.family!r}: config section {spec.config_section!r} is already "
                         f"family {taken[spec.config_section]!r}'s; name another")
    _SPECS[spec.family] = spec
    return spec


def close_registry(reader: str) -> None:
    """Mark the registry as read by ``reader``, which built something from it that cannot grow."""
    global _CLOSED_BY
    _CLOSED_BY = _CLOSED_BY or reader


def families() -> list[str]:
    """The registered family names."""
    return list(_SPECS)


def get_spec(family: str) -> ModelSpec:
    if family not in _SPECS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(_SPECS)}")
    return _SPECS[family]


def spec_for(cfg_or_model: Any) -> ModelSpec:
    """The spec of a model config or of a model (an ``nn.Module`` whose ``cfg`` is one)."""
    cfg = cfg_or_model.cfg if isinstance(cfg_or_model, nn.Module) else cfg_or_model
    for spec in _SPECS.values():
        if isinstance(cfg, spec.config_cls):
            return spec
    raise TypeError(f"no model family has config type {type(cfg).__name__}")


def build_model(cfg: Any) -> nn.Module:
    return spec_for(cfg).build(cfg)


def model_spec(cfg: Any) -> dict[str, Any]:
    """The JSON that describes a model (``model.json``): its family and config."""
    return {"family": spec_for(cfg).family, "config": to_dict(cfg)}


def config_from_spec(spec: dict[str, Any]) -> Any:
    """The model config of a ``model.json``."""
    return from_dict(get_spec(spec.get("family")).config_cls, spec["config"])
