"""How a training step uses memory: the CPU allocator's reuse of freed blocks, activation checkpointing."""

from __future__ import annotations

import ctypes

import torch.nn as nn


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning freed blocks to the OS between training steps.

    glibc serves allocations above its mmap threshold with fresh ``mmap`` calls and unmaps
    them on free, so every step's large activations page-fault in again (expensive in a VM).
    Raising the mmap and trim thresholds keeps the freed memory in the heap for reuse, as
    jemalloc/tcmalloc do (PyTorch's CPU performance guide recommends those for this reason).
    A no-op off glibc; benchmarks/train_throughput.py measures the gain (docs/train.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in the backward pass; parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
