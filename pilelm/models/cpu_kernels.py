"""CPU inference kernels: linear layers that multiply by a repacked copy of their weight.

Decoding multiplies a few rows (one token per sequence) by every weight matrix, so each token
streams all the weights from memory. On CPU, aten's ``linear`` reads an (out, in) weight at
about half the streaming bandwidth for such shapes, and the same product from a repacked copy
runs near it: oneDNN's blocked layout (also faster for bf16 and for several rows), or, for
one fp32 row on one thread where oneDNN runs serially, W^T contiguous + ``addmm`` when
out > in (else aten's own layout reads fastest). The measured bandwidths and speedups are in
docs/generate.md ("Decoding throughput"; ``benchmarks/generate_throughput.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# Up to this many rows (tokens) per call, CPU inference multiplies by the repacked copy.
DECODE_MAX_ROWS = 64


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def repack_kind(rows: int, dtype: torch.dtype) -> str | None:
    """The repacked layout that multiplies ``rows`` rows fastest: "t" (W^T, for one fp32 row on
    one thread, where oneDNN runs serially), "onednn", or None (``F.linear``)."""
    if rows == 1 and dtype == torch.float32 and torch.get_num_threads() == 1:
        return "t"
    return "onednn" if _onednn_packs(dtype) else None


def can_repack(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``RepackedLinear`` may use a repacked copy of ``w`` for input ``x``: only under
    ``torch.inference_mode`` (generation and serving; evaluation inside a training run, where
    the weights change between calls and may be sharded, keeps ``F.linear``), not under
    autocast or compilation, and not for weights made under ``torch.inference_mode``, which
    have no version counter to notice in-place changes by."""
    return (torch.is_inference_mode_enabled() and x.dtype == w.dtype and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not w.is_inference())


class RepackedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that, in CPU inference
    (``torch.inference_mode``) on at most ``DECODE_MAX_ROWS`` rows, multiplies by a repacked
    copy of its weight.

    The copy is made on first use and remade when the weight changes (an optimizer step,
    ``load_state_dict``, ``.to()``); it costs one more weight's worth of memory. Only code
    under ``torch.inference_mode`` uses it; training, ``no_grad`` evaluation, autocast,
    compiled graphs, other devices and weights made under ``torch.inference_mode`` (which have
    no version counter) take ``F.linear``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        # deepcopy / pickle: the copies are a cache (and oneDNN's have no storage to copy).
        return {**self.__dict__, "_packed": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() > DECODE_MAX_ROWS * x.size(-1)
                or not can_repack(x, self.weight)):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.size(-1))
        return self.repacked_matmul(x2, repack_kind(x2.size(0), x.dtype)).view(*x.shape[:-1], self.out_features)

    def repacked_matmul(self, x: torch.Tensor, kind: str | None) -> torch.Tensor:
        """x (rows, in) -> (rows, out) from the weight repacked as ``kind`` (``repack_kind``);
        the caller has checked ``can_repack`` and that this is CPU inference on a few rows."""
        if kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._repacked("onednn"), self.bias, "none", [], "")
        if kind == "t" and self.out_features > self.in_features:  # else aten's own layout reads fastest
            packed = self._repacked("t")
            return x @ packed if self.bias is None else torch.addmm(self.bias, x, packed)
        return F.linear(x, self.weight, self.bias)

    def _repacked(self, kind: str) -> torch.Tensor:
        w = self.weight
        entry = self._packed.get(kind)
        # The entry holds the source storage, so a new weight cannot reuse its address.
        if entry is None or entry[1] != w._version or entry[0].data_ptr() != w.data_ptr() or entry[0].dtype != w.dtype:
            src = w.detach()
            packed = src.t().contiguous() if kind == "t" else torch.ops.mkldnn._reorder_linear_weight(src)
            entry = (src, w._version, packed)
            self._packed[kind] = entry
        return entry[2]
