"""What a model family's Hugging Face adapter provides, and helpers the adapters share.

Each family's ``ModelSpec.hf_adapter`` names a module under ``pilelm/interop/`` that defines
``ADAPTER = HFAdapter(...)``; the export and import stages (``interop/hf.py``) only call these.
A weight map is a list of (our key, HF key, transform) rows, built as the trunk's rows plus
the head's, so a new head (a classification layer, say) is one more map function and one
more architecture name in its family's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

WeightMap = list[tuple[str, str, str]]
"""(our key, HF key, transform) rows; the transform's meaning is the adapter's ("" copies)."""


@dataclass(frozen=True)
class HFAdapter:
    """How one pilelm model family maps to transformers."""

    model_types: tuple[str, ...]
    """The transformers ``model_type`` values this family imports (``config.json``)."""
    config_from_hf: Callable[[dict[str, Any], dict[str, torch.Tensor], str], Any]
    """(transformers config dict, HF weights, source for errors) -> our model config."""
    hf_config: Callable[[Any, int | None, int | None, str], Any]
    """(our config, bos id, eos id, dtype name) -> the transformers config object."""
    to_hf: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    """(our config, our state dict) -> the HF state dict."""
    from_hf: Callable[[Any, dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    """(our config, HF state dict, source for errors) -> our state dict (strict)."""


def ffn_width(width: int | None, d_model: int) -> int:
    """Our d_ff of an HF intermediate size: 0 stands for the default 4 * d_model."""
    return 0 if not width or width == 4 * d_model else int(width)
