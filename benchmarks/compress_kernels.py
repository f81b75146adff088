"""Per-linear CPU kernels for decoding at GPT-2 124M shapes: which kernel each quantization
method should call.

For each weight shape of GPT-2 124M (in x out: attention qkv 768x2304, attention output
768x768, MLP in 768x3072, MLP out 3072x768, the tied LM head 768x50257) and each row count
(1 and 8 tokens per call), the time of one product ``x (M, in) @ W^T`` through:

- ``bf16 aten``: ``F.linear`` on the (out, in) bf16 weight;
- ``bf16 onednn``: oneDNN's blocked bf16 copy (``mkldnn._linear_pointwise``, pilelm's float path);
- ``int8 pack_mm``: ``aten._weight_int8pack_mm`` (int8 weight, per-row scale, bf16 activations);
- ``int4 pack_mm gG``: ``aten._weight_int4pack_mm_for_cpu`` with group size G (32, 64, 128);
- ``int8 dyn onednn``: activations quantized to uint8 per call in Python, then oneDNN's
  u8 x s8 ``onednn.qlinear_pointwise`` (bf16 out);
- ``int8 dyn fbgemm`` / ``int8 dyn x86``: ``torch.ao``'s dynamic quantized linear
  (``quantized.linear_dynamic``, fp32 activations, quantized inside the kernel) under those
  quantized engines; ``int8 dyn pilelm``: pilelm's int8-dynamic layer (that kernel, bf16 in
  and out).

Every kernel of a shape runs in interleaved rounds (A B C ... A B C ...); each round times a
loop of calls (``--clock cpu`` times the process's CPU time instead of the wall clock: on a
machine loaded beyond its cores, 2-thread kernels wait for time slices at every barrier and
every kernel then takes a scheduler quantum; with ``--threads 1 --clock cpu`` the ranking
survives the load). Printed per kernel: the best round, and the median over rounds of its time
divided by the ``bf16 onednn`` time of the same round (the paired ratio: load hits both).

    .venv/bin/python benchmarks/compress_kernels.py [--threads 2] [--rows 1 8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from pilelm.compress.quantized_linear import QuantizedLinear

SHAPES = {"attn qkv": (768, 2304), "attn out": (768, 768), "mlp in": (768, 3072), "mlp out": (3072, 768),
          "lm head": (768, 50257)}
BASELINE = "bf16 onednn"


def _int4_mm(xb: torch.Tensor, xf: torch.Tensor, packed: torch.Tensor, group: int,
             scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, scales_and_zeros)


def _onednn_dynamic(xb: torch.Tensor, xf: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor,
                    w_zeros: torch.Tensor) -> torch.Tensor:
    """Activations quantized to uint8 in Python (one scale per call), then oneDNN's u8 x s8 GEMM."""
    lo, hi = min(float(xf.min()), 0.0), max(float(xf.max()), 0.0)
    x_scale = max((hi - lo) / 255.0, 1e-12)
    x_zero = round(-lo / x_scale)
    xq = torch.clamp(torch.round(xf / x_scale) + x_zero, 0, 255).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(xq, x_scale, x_zero, packed, w_scales, w_zeros, None, 1.0, 0,
                                              torch.bfloat16, "none", [], "")


def kernels(w: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> f(x_bf16, x_fp32) for the (out, in) fp32 weight ``w``."""
    out_f, in_f = w.shape
    wb = w.to(torch.bfloat16)
    packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(wb)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = w.clone()
    q8 = QuantizedLinear.from_linear(lin, "int8-weight")
    scales8 = q8.scales.to(torch.bfloat16)
    fns: dict[str, Callable] = {
        "bf16 aten": lambda xb, xf: F.linear(xb, wb),
        BASELINE: lambda xb, xf: torch.ops.mkldnn._linear_pointwise(xb, packed_bf16, None, "none", [], ""),
        "int8 pack_mm": lambda xb, xf: torch.ops.aten._weight_int8pack_mm(xb, q8.qweight, scales8),
    }
    for g in (32, 64, 128):
        if out_f % 16 == 0:  # the int4 kernel's tiling; the LM head's 50257 rows need padding to 50272
            q4 = QuantizedLinear.from_linear(lin, "int4-weight", g)
        else:
            pad = torch.nn.Linear(in_f, (out_f + 15) // 16 * 16, bias=False)
            pad.weight.data.zero_()
            pad.weight.data[:out_f] = w
            q4 = QuantizedLinear.from_linear(pad, "int4-weight", g)
        packed4, sz = q4._kernel_inputs(torch.bfloat16)
        fns[f"int4 pack_mm g{g}"] = partial(_int4_mm, packed=packed4, group=g, scales_and_zeros=sz)
    qd = QuantizedLinear.from_linear(lin, "int8-dynamic")
    packed_u8, w_scales, w_zeros = (torch.ops.onednn.qlinear_prepack(q8.qweight, [1, in_f]), q8.scales,
                                    torch.zeros(out_f, dtype=torch.long))
    fns["int8 dyn onednn"] = partial(_onednn_dynamic, packed=packed_u8, w_scales=w_scales, w_zeros=w_zeros)
    fns["int8 dyn pilelm"] = lambda xb, xf: qd.repacked_matmul(xb)
    for engine in ("fbgemm", "x86"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        qw = torch.quantize_per_channel(w, q8.scales.double(), torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        fns[f"int8 dyn {engine}"] = (lambda p: lambda xb, xf: torch.ops.quantized.linear_dynamic(xf, p, True))(packed)
    return fns


CLOCK = time.perf_counter


def time_loop(fn: Callable, xb: torch.Tensor, xf: torch.Tensor, calls: int) -> float:
    t0 = CLOCK()
    for _ in range(calls):
        fn(xb, xf)
    return (CLOCK() - t0) / calls


def bench_shape(w: torch.Tensor, rows: int, rounds: int, budget_s: float) -> dict[str, tuple[float, float]]:
    """name -> (best seconds per call, median paired ratio to BASELINE)."""
    fns = kernels(w)
    xf = torch.randn(rows, w.size(1))
    xb = xf.to(torch.bfloat16)
    with torch.inference_mode():
        for fn in fns.values():
            fn(xb, xf)
        # Calls per timed loop: each kernel's loop lasts about the same (budget / kernels / rounds).
        calls = {k: max(2, min(2000, int(budget_s / len(fns) / rounds / time_loop(fn, xb, xf, 5))))
                 for k, fn in fns.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(time_loop(fn, xb, xf, calls[name]))
    base = times[BASELINE]
    return {k: (min(v), statistics.median(a / b for a, b in zip(v, base, strict=True))) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds-per-shape", type=float, default=3.0, help="time budget of one shape at one row count")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the process's CPU time, robust to time-slicing on a loaded machine with "
                         "--threads 1 (with more threads it counts the workers' spinning too)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
          f"{torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("\nmicroseconds per call: best round / paired median time ratio to bf16 onednn (< 1 is faster)\n")
    header = False
    for rows in args.rows:
        for shape_name, (in_f, out_f) in SHAPES.items():
            w = torch.randn(out_f, in_f) * 0.02
            res = bench_shape(w, rows, args.rounds, args.seconds_per_shape)
            if not header:
                print("| M | weight (in x out) | " + " | ".join(res) + " |")
                print("|---:|---|" + "---:|" * len(res), flush=True)
                header = True
            cells = [f"{t * 1e6:.0f} / {r:.2f}" for t, r in res.values()]
            print(f"| {rows} | {shape_name} {in_f}x{out_f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
