"""`pilelm quantize RUN -o Q --method int8-weight|int8-dynamic|int4-weight`: post-training
quantization of a run's linear layers for CPU inference.

The output is a run directory (``pilelm train`` layout) whose ``model.json`` carries a
``quantization`` entry: the method, the group size and the names of the quantized modules.
``training.checkpoint.load_model`` sees that entry and asks ``rebuild_quantized`` here to put
``QuantizedLinear`` modules in those places before it loads the weights, so ``generate``,
``eval`` and ``serve`` read a quantized run like any other. Weights are safetensors (int8 or
packed int4 values, fp32 scales), never pickles. Embeddings and norms stay in ``dtype``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from pilelm.compress.derived_run import write_derived_run
from pilelm.compress.quantized_linear import INT4_GROUP_SIZES, METHODS, QuantizedLinear, int4_supported
from pilelm.core.manifest import Timer, write_manifest
from pilelm.models.dtypes import DTYPES
from pilelm.training.checkpoint import QUANTIZATION_KEY, load_for_inference

log = logging.getLogger(__name__)


@dataclass
class QuantizeConfig:
    run: str = ""
    """Run directory to quantize (pilelm train / import / prune output)."""
    output: str = ""
    """Run directory to write (-o); generate, eval and serve read it."""
    method: Literal["int8-weight", "int8-dynamic", "int4-weight"] = "int8-weight"
    """int8-weight: int8 weights, a scale per output channel; int8-dynamic: that, with activations quantized per row on the fly (int8 GEMM); int4-weight: 4-bit weights, a scale and minimum per group of group_size inputs."""
    group_size: int = 128
    """int4-weight: input channels per scale (32, 64, 128 or 256); layers whose input width it does not divide stay unquantized."""
    lm_head: bool = True
    """Quantize the output projection too (a tied one gets its own quantized copy; the embedding stays in dtype)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the weights left in floating point (embeddings, norms, biases)."""
    step: int | None = None
    """Checkpoint step to quantize; None = the latest."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantize_model(model: nn.Module, method: str, group_size: int = 128, lm_head: bool = True) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by ``QuantizedLinear`` in place; returns the
    names of the replaced modules (int4 skips shapes its kernel cannot take)."""
    if is_quantized(model):
        raise ValueError("the model is already quantized; quantize the unquantized run instead")
    names = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or (name == "lm_head" and not lm_head):
            continue
        if method == "int4-weight" and not int4_supported(mod.in_features, mod.out_features, group_size):
            log.warning("%s (%d -> %d) stays unquantized: int4 needs in_features %% %d == 0",
                        name, mod.in_features, mod.out_features, group_size)
            continue
        model.set_submodule(name, QuantizedLinear.from_linear(mod, method, group_size))
        names.append(name)
    return names


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point weights outside ``QuantizedLinear`` modules (whose scales stay fp32)."""
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(mod, name, b.to(dtype))


def quantization_spec(method: str, group_size: int, modules: list[str]) -> dict[str, Any]:
    """The ``model.json`` entry that ``rebuild_quantized`` reads back."""
    return {"method": method, "group_size": group_size, "modules": modules}


def rebuild_quantized(model: nn.Module, spec: dict[str, Any]) -> None:
    """Put empty ``QuantizedLinear`` modules where ``spec`` says, ready for ``load_state_dict``
    (the loader's hook for runs whose ``model.json`` has a ``quantization`` entry)."""
    method, group_size = spec["method"], int(spec["group_size"])
    for name in spec["modules"]:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"model.json quantizes {name}, which is a {type(lin).__name__}, not a linear layer")
        model.set_submodule(name, QuantizedLinear(lin.in_features, lin.out_features, method, lin.bias is not None,
                                                  group_size))


def run_quantize(cfg: QuantizeConfig) -> Path:
    if not cfg.run or not cfg.output:
        raise ValueError("quantize needs a run and an output: pilelm quantize RUN_DIR -o OUT_DIR --method int8-weight")
    timer = Timer()
    out = Path(cfg.output)
    with timer("quantize"):
        model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step)
        if is_quantized(model):
            raise ValueError(f"run {cfg.run} is already quantized; quantize the run it was made from")
        n_params = sum(p.numel() for p in model.parameters())
        modules = quantize_model(model, cfg.method, cfg.group_size, cfg.lm_head)
        cast_unquantized(model, DTYPES[cfg.dtype])
        if not modules:
            raise ValueError(f"no linear layer of {cfg.run} fits {cfg.method} with group_size {cfg.group_size}; "
                             "try a smaller group_size")
        ckpt = write_derived_run(cfg.run, cfg.step, out, model, model_cfg, tok_dir,
                                 {QUANTIZATION_KEY: quantization_spec(cfg.method, cfg.group_size, modules)})
    counts = {"parameters": n_params, "quantized_modules": len(modules),
              "bytes": (ckpt / "model.safetensors").stat().st_size}
    write_manifest(out, "quantize", cfg, inputs=[cfg.run], counts=counts, timings=timer.timings)
    log.info("quantized %d linear layers of %s (%s) into %s (%d bytes)", len(modules), cfg.run, cfg.method, out,
             counts["bytes"])
    return out
