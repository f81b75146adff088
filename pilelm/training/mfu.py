"""Model FLOPs utilisation: achieved FLOP/s over the device's peak, and where the peak comes from.

MFU (Chowdhery et al. 2022, "PaLM", appendix B) is only as good as its denominator. A peak
measured once on a busy machine reads low (another job's threads share the cores) and the
MFU above it reads high: over 100 % is a broken denominator, not a fast run. So:

- a GPU whose name is in ``DATASHEET_BF16`` uses the vendor's dense bf16 peak;
- otherwise the peak is the best of several short matmul measurements in the device's fastest
  native dtype (``peak_dtype``: bf16 where it is native, else fp32), and the run dir's
  ``hardware.json`` keeps the best ever seen for the device (a later quiet run raises it);
- an achieved rate above the peak proves the peak too low: the peak is raised to it (MFU
  reads 100 %) with one warning, so MFU is never logged above 100 %.

The log says which peak is used (``PeakFlops.describe``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pilelm.core.atomic import atomic_write_json
from pilelm.models.dtypes import bf16_native
from pilelm.training.precision import matmul_flops

log = logging.getLogger(__name__)

DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
"""Dense bf16 tensor-core FLOP/s by GPU name (vendors' datasheets, without sparsity)."""

MEASUREMENTS = 3
"""Matmul measurements per start; the best counts (the least disturbed by other work)."""


@dataclass
class PeakFlops:
    """The MFU denominator of one device and where it came from."""

    value: float
    source: str
    """``configured`` (loop.peak_flops), ``datasheet NAME``, ``measured`` (best of this start
    and the run dir's earlier ones) or ``achieved`` (raised to a rate the run reached)."""

    def describe(self) -> str:
        return f"{self.value / 1e12:.2f} TFLOP/s ({self.source})"

    def utilisation(self, flops_per_s: float) -> float:
        """``flops_per_s / peak``, at most 1: a higher rate raises the peak (and says so once)."""
        if self.value <= 0:
            return 0.0
        if flops_per_s > self.value:
            log.warning("achieved %.2f TFLOP/s is above the MFU peak %s: the peak was measured under "
                        "load; using the achieved rate as the peak from now on (set loop.peak_flops "
                        "to the device's real peak)", flops_per_s / 1e12, self.describe())
            self.value, self.source = flops_per_s, "achieved"
        return flops_per_s / self.value


def datasheet_peak(device: torch.device) -> PeakFlops | None:
    """The datasheet bf16 peak of a known GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16.items():
        if key in name:
            return PeakFlops(value, f"datasheet {key}")
    return None


def peak_dtype(device: torch.device) -> torch.dtype:
    """The dtype whose matmul rate is ``device``'s peak: bf16 where bf16 matmuls are native, else
    fp32. Emulated bf16 is no peak: on a CPU without AVX512-BF16/AMX one 1024^3 bf16 matmul
    takes seconds (~40x slower than fp32), so a bf16 "peak" would sit below what fp32 training
    (the only precision such a CPU trains in) achieves, and every MFU would read 100 %."""
    return torch.bfloat16 if bf16_native(device) else torch.float32


def best_measured_flops(device: torch.device, measurements: int = MEASUREMENTS) -> float:
    """The best of ``measurements`` short matmul rate measurements in ``peak_dtype(device)``."""
    dtype = peak_dtype(device)
    return max(matmul_flops(device, dtype=dtype, seconds=0.2) for _ in range(measurements))


def resolve_peak(device: torch.device, configured: float, cache: Path | None, measure: bool = True) -> PeakFlops:
    """The peak per device: ``configured`` if set, else the datasheet, else the best measured
    (``cache``, a ``hardware.json``, keeps the best per device, thread count and dtype). Ranks
    that do not ``measure`` read the cache (0 when it is empty: no MFU)."""
    if configured:
        return PeakFlops(configured, "configured")
    known = datasheet_peak(device)
    if known is not None:
        return known
    dtype = str(peak_dtype(device)).removeprefix("torch.")
    key = f"{device.type}:{torch.get_num_threads()}:{dtype}"
    cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    best = float(cached.get(key, 0.0))
    if measure:
        best = max(best, best_measured_flops(device))
        if cache is not None:
            atomic_write_json(cache, {**cached, key: best})
    return PeakFlops(best, f"measured, best of {MEASUREMENTS} {dtype} matmul runs and earlier starts")
