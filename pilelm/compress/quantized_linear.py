"""Linear layers with quantized weights for CPU inference, on PyTorch's own aten kernels.

Three methods, each a drop-in for ``models.cpu_kernels.RepackedLinear`` (same ``forward`` and the
``repacked_matmul`` the flat decode path calls):

- ``int8-weight``: int8 weights, one symmetric scale per output channel (absmax / 127);
  activations stay bf16/fp32. ``aten._weight_int8pack_mm``.
- ``int4-weight``: 4-bit weights, asymmetric per group of ``group_size`` input channels (a
  scale and a minimum per group), GPTQ/AWQ's storage without their calibration.
  ``aten._weight_int4pack_mm_for_cpu`` (the kernel torchao's ``Int4CPULayout`` calls).
- ``int8-dynamic``: int8 weights as ``int8-weight``, and the activations quantized on the fly
  to uint8 (one asymmetric scale per call, inside the kernel), so the product is an
  u8 x s8 -> s32 GEMM: PyTorch's dynamic quantized linear (``quantized.linear_dynamic``, the
  kernel of ``torch.ao``'s dynamic quantization; the ``x86`` engine, oneDNN/fbgemm with VNNI
  where the CPU has it), as in LLM.int8() without the outlier split (Dettmers et al. 2022).

Each kernel was picked per method from per-linear timings at GPT-2 124M shapes
(``benchmarks/compress_kernels.py``, docs/compress.md).

The weight-only kernels are built for a few bf16 rows (decoding: one token per sequence).
With fp32 activations their time grows linearly from the second row (~2 ms per row and
768x3072 layer on one AVX2 core: `pilelm eval` in fp32 of an int8-weight model ran ~20x
slower than the float model), and with bf16 ones they fall behind an fp32 GEMM past ~64 rows.
So more rows than that (``dequantize_above``: prompt prefill, ``pilelm eval``, the
compression report's BPB; any fp32 call of more than one row) multiply by the weight
dequantized to fp32, one layer at a time and freed after the call, through ``F.linear`` in
fp32 (fast on every x86 CPU, where a bf16 GEMM is fast only with AVX512-BF16 or AMX); the
extra cost over the float model is the dequantization, ~1/rows of the product.
int8-dynamic keeps its kernel: it is a u8 x s8 GEMM, as fast as fp32 on many rows.
Per-layer timings: docs/compress.md; prefill tokens/s of whole models: ``benchmarks/decode_engines.py``.

The stored form is what the state dict holds (safetensors): ``qweight`` (int8, or two 4-bit
values per uint8 byte, low nibble first), ``scales`` (and ``mins`` for int4), ``bias``. The
kernels' packed layouts are caches made on first use, never saved.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("int8-weight", "int8-dynamic", "int4-weight")
MANY_ROWS = 64
"""Above this many bf16 rows per call, int8-weight and int4-weight multiply by the weight
dequantized to fp32 instead of their few-row kernels (with fp32 rows: above one row).
Crossover measured on one AVX2 core, 768x3072, CPU time (docs/compress.md): at 64 rows
the bf16 kernels and the fp32 product take about the same time; at 256, 1.4-1.8x less for
the fp32 product."""


def dequantize_above(dtype: torch.dtype) -> int:
    """Calls of more rows than this take the dequantized fp32 product (see ``MANY_ROWS``)."""
    return 1 if dtype == torch.float32 else MANY_ROWS
INT4_GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 weights, fp32 scale per row); |w - q * s| <= s / 2."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q in 0..15 as uint8 (out, in), scales, mins (out, in / group_size)):
    w ~ q * scale + min, |w - dequantized| <= scale / 2 (round to nearest of 16 levels spanning
    the group's [min, max])."""
    out_f, in_f = w.shape
    g = w.detach().float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(out_f, in_f), scales, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) uint8, element 2j in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.size(0), packed.size(1) * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


INT4_ROW_BLOCK = 16
"""aten's CPU int4 kernel tiles output rows in blocks of 16; other row counts are padded with
zero rows in the kernel's copy (GPT-2's 50257-row LM head) and the extra outputs dropped."""


def int4_supported(in_features: int, out_features: int, group_size: int) -> bool:
    """Shapes int4-weight takes: whole groups of input channels."""
    return in_features % group_size == 0 and in_features % 2 == 0


def _identity(t: torch.Tensor) -> tuple[int, int]:
    """Address and version of a buffer (tensors made under inference_mode have no version)."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


DYNAMIC_ENGINES = ("x86", "fbgemm", "onednn")
"""Quantized engines for int8-dynamic, in order of preference (all VNNI u8 x s8 GEMMs on x86)."""


@functools.cache
def dynamic_engine() -> str | None:
    """The quantized engine int8-dynamic's kernel packs its weights for (None: none built in)."""
    return next((e for e in DYNAMIC_ENGINES if e in torch.backends.quantized.supported_engines), None)


def _prepack_dynamic(qweight: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """The packed weight of ``quantized.linear_dynamic`` for int8 values and per-row scales."""
    engine, previous = dynamic_engine(), torch.backends.quantized.engine
    zeros = torch.zeros(qweight.size(0), dtype=torch.long)
    with warnings.catch_warnings():
        # Quantized tensors are deprecated as a user-facing type; here one only carries the
        # values and scales into the kernel's packing, which is what the kernel reads.
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
    try:
        torch.backends.quantized.engine = engine
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, method: str, bias: bool, group_size: int = 128):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int4-weight":
            if not int4_supported(in_features, out_features, group_size):
                raise ValueError(f"int4-weight needs in_features ({in_features}) divisible by group_size "
                                 f"({group_size})")
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups))
            self.register_buffer("mins", torch.zeros(out_features, groups))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel_cache: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kernel_cache": None}

    @classmethod
    def from_linear(cls, lin: nn.Linear, method: str, group_size: int = 128) -> QuantizedLinear:
        q = cls(lin.in_features, lin.out_features, method, lin.bias is not None, group_size)
        with torch.no_grad():
            if method == "int4-weight":
                values, scales, mins = quantize_int4(lin.weight, group_size)
                q.qweight.copy_(pack_nibbles(values))
                q.mins.copy_(mins)
            else:
                values, scales = quantize_int8(lin.weight)
                q.qweight.copy_(values)
            q.scales.copy_(scales)
            if lin.bias is not None:
                q.bias.copy_(lin.bias.float())
        return q.to(lin.weight.device)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) fp32 weight these values stand for."""
        if self.method == "int4-weight":
            q = unpack_nibbles(self.qweight).float().view(self.out_features, -1, self.group_size)
            w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
            return w.view(self.out_features, self.in_features)
        return self.qweight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4-weight" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        return self.repacked_matmul(x2, None).view(*x.shape[:-1], self.out_features)

    def repacked_matmul(self, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """x (rows, in) -> (rows, out); ``kind`` (the float layers' layout choice) is ignored:
        each method has one kernel."""
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) or (
                self.method == "int8-dynamic" and dynamic_engine() is None) or (
                x.size(0) > dequantize_above(x.dtype) and self.method != "int8-dynamic"):
            # Other devices, a gradient through the activations (quantization-aware
            # fine-tuning is not offered), or many rows (an fp32 GEMM beats the few-row
            # kernels): the dequantized weight through F.linear.
            return self.dequantized_matmul(x)
        if self.method == "int8-weight":
            (scales,) = self._kernel_inputs(x.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, scales)
        elif self.method == "int4-weight":
            packed, scales_and_mins = self._kernel_inputs(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, self.group_size, scales_and_mins)
            if y.size(1) != self.out_features:  # padded rows
                y = y[:, : self.out_features]
        else:
            (packed,) = self._kernel_inputs(torch.float32)
            # fp32 in and out (the kernel's contract); reduce_range: 7-bit activations, which
            # keep fbgemm's u8 x s8 pairwise sums from saturating int16 on CPUs without VNNI.
            y = torch.ops.quantized.linear_dynamic(x.float(), packed, True).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) -> (rows, out) in fp32 through the dequantized weight, in x's dtype."""
        y = F.linear(x.float(), self.dequantize(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def _kernel_inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The stored values in the layout (and activation dtype) the method's kernel reads;
        remade when the buffers or the dtype change (``load_state_dict``, ``.to()``)."""
        key = (dtype, *(_identity(t) for t in (self.qweight, self.scales)))
        if self._kernel_cache is not None and self._kernel_cache[0] == key:
            return self._kernel_cache[1]
        with torch.inference_mode(False), torch.no_grad():
            if self.method == "int8-weight":
                made: tuple[torch.Tensor, ...] = (self.scales.to(dtype),)
            elif self.method == "int4-weight":
                # The kernel computes (q - 8) * scale + zero, so its zero is min + 8 * scale.
                pad = -self.out_features % INT4_ROW_BLOCK
                q = F.pad(unpack_nibbles(self.qweight).to(torch.int32), (0, 0, 0, pad))
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                scales = F.pad(self.scales.float(), (0, 0, 0, pad), value=1.0)
                zeros = F.pad(self.mins.float(), (0, 0, 0, pad)) + 8 * scales
                scales_and_mins = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
                made = (packed, scales_and_mins)  # (in / group, out, 2)
            else:
                made = (_prepack_dynamic(self.qweight, self.scales),)
        self._kernel_cache = (key, made)
        return made
