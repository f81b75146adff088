"""Weight dtypes by the names configs use, and whether bf16 is fast on a device.

One table for every stage that loads a model (eval, generate, serve, export, import).
"""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype called ``name``; ``auto`` picks bfloat16 where bf16 matmuls are native, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
