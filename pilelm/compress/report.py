"""`pilelm compress report BASE RUN... --data SHARDS -o OUT`: one table of what each
compressed run costs and gains against its base: parameters, bytes on disk, test BPB (overall
and per Pile component, through ``pilelm eval``), and greedy decode tokens/s at batch 1 and 8,
each also as a ratio to the base (the first run). Decoding runs interleaved, best of
``repeats`` rounds, so load on a shared machine hits every run alike.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from pilelm.compress.quantized_linear import QuantizedLinear
from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.core.manifest import Timer, clear_manifest, write_manifest
from pilelm.evaluation.evaluate import EvalConfig, run_eval
from pilelm.inference.decode_batch import stream_batch
from pilelm.inference.sampling import SamplingParams
from pilelm.models import build_model
from pilelm.models.dtypes import DTYPES
from pilelm.training.checkpoint import latest_checkpoint, load_for_inference

log = logging.getLogger(__name__)


@dataclass
class CompressReportConfig:
    runs: list[str] = field(default_factory=list)
    """The base run first, then the compressed runs made from it."""
    data: str = ""
    """Shard dir (or prepared dir) whose split is scored for BPB; empty = no BPB columns."""
    output: str = ""
    """Output folder (-o): report.md, report.json, eval/."""
    split: str = "test"
    """Split scored for BPB."""
    max_documents: int = 0
    """Score only the first N documents (0 = all)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype of every run, for BPB and decoding (quantized layers keep their own weights)."""
    prompt_len: int = 32
    """Decode benchmark: prompt tokens (random ids)."""
    new_tokens: int = 64
    """Decode benchmark: tokens generated per row (greedy)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    """Decode benchmark: batch sizes."""
    repeats: int = 2
    """Decode benchmark: interleaved rounds; the best of each run is kept."""

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1 or not self.batch_sizes:
            raise ValueError("prompt_len, new_tokens and repeats must be >= 1 and batch_sizes non-empty")


def logical_parameters(model: nn.Module) -> int:
    """Parameters of the model's architecture (a quantized layer counts its weight's values once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model.cfg).parameters())


def greedy_decode(model: nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=0.0)] * len(prompts)
    with torch.inference_mode():
        return list(stream_batch(model, prompts, params, eos_id=None))


def race_rounds(fns: list[Callable[[], Any]], repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Times of each function in ``repeats`` interleaved rounds (A B C, A B C, ...), so load on
    a shared machine hits the functions of one round alike: ``times[i][round]``. ``clock`` is
    the wall clock, or ``time.process_time`` (CPU time) for one-thread runs on a loaded machine."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            times[i].append(clock() - t0)
    return times


def race(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` interleaved rounds."""
    return [min(t) for t in race_rounds(fns, repeats)]


def decode_speeds(models: list[nn.Module], vocab: int, cfg: CompressReportConfig) -> list[dict[int, float]]:
    """tok/s of each model at each batch size (prompt prefill included)."""
    out: list[dict[int, float]] = [{} for _ in models]
    for bs in cfg.batch_sizes:
        gen = torch.Generator().manual_seed(bs)
        prompts = torch.randint(0, vocab, (bs, cfg.prompt_len), generator=gen).tolist()
        for m in models:  # warm up (kernel caches, packed weights)
            greedy_decode(m, prompts, 2)
        times = race([partial(greedy_decode, m, prompts, cfg.new_tokens) for m in models], cfg.repeats)
        for i, t in enumerate(times):
            out[i][bs] = bs * cfg.new_tokens / t
    return out


def describe(run: Path) -> str:
    """What made a run: the stage and its method."""
    m = json.loads((run / "manifest.json").read_text())
    c = m.get("config", {})
    if m["stage"] == "quantize":
        return f"quantize {c.get('method')}"
    if m["stage"] == "prune":
        how = (f"prune magnitude {c.get('sparsity')}" if c.get("method") == "magnitude"
               else f"prune heads {c.get('heads')} channels {c.get('channels')}")
        return how + (f" + {c['recovery_steps']} recovery steps" if c.get("recovery_steps") else "")
    if m["stage"] == "distill":
        return f"distill T={c.get('distill', {}).get('temperature')} from {Path(c.get('teacher', '')).name}"
    return m["stage"]


def report_markdown(rows: list[dict[str, Any]], batch_sizes: list[int], components: list[str],
                    split: str = "test") -> str:
    base = rows[0]

    def ratio(key: str, row: dict[str, Any], sub: Any = None) -> str:
        a, b = (row[key], base[key]) if sub is None else (row[key].get(sub), base[key].get(sub))
        return f"{a / b:.2f}x" if a and b else "-"

    head = ["run", "made by", "parameters", "bytes on disk", f"{split} BPB"] + [f"tok/s b={b}" for b in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        bpb = f"{r['bpb']:.4f} ({ratio('bpb', r)})" if r.get("bpb") else "-"
        cells = [r["name"], r["made_by"], f"{r['parameters'] / 1e6:.2f}M ({ratio('parameters', r)})",
                 f"{r['bytes'] / 1e6:.2f} MB ({ratio('bytes', r)})", bpb]
        cells += [f"{r['tok_s'][b]:.1f} ({ratio('tok_s', r, b)})" for b in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    if components:
        lines += ["", "BPB per component:", "", "| run | " + " | ".join(components) + " |",
                  "|---|" + "---:|" * len(components)]
        for r in rows:
            lines.append(f"| {r['name']} | " + " | ".join(f"{r['components'].get(c, float('nan')):.4f}"
                                                         for c in components) + " |")
    return "\n".join(lines) + "\n"


def run_compress_report(cfg: CompressReportConfig) -> Path:
    if len(cfg.runs) < 2 or not cfg.output:
        raise ValueError("compress report needs a base run, at least one compressed run and an output: "
                         "pilelm compress report BASE_RUN COMPRESSED_RUN... --data SHARD_DIR -o REPORT_DIR")
    out = Path(cfg.output)
    timer = Timer()
    runs = [Path(r) for r in cfg.runs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs must have distinct folder names (they label the table): {names}")
    evals: dict[str, Any] = {}
    if cfg.data:
        with timer("bpb"):
            run_eval(EvalConfig(runs=[str(r) for r in runs], data=cfg.data, output=str(out / "eval"),
                                split=cfg.split, max_documents=cfg.max_documents, dtype=cfg.dtype, unigram=False))
        evals = json.loads((out / "eval" / "results.json").read_text())["runs"]
    models, rows = [], []
    for run, name in zip(runs, names, strict=True):
        model, model_cfg, _ = load_for_inference(run)
        models.append(model.to(DTYPES[cfg.dtype]))
        ev = evals.get(name, {})
        rows.append({
            "name": name, "run": str(run), "made_by": describe(run),
            "parameters": logical_parameters(model),
            "bytes": (latest_checkpoint(run) / "model.safetensors").stat().st_size,
            "quantized_layers": sum(isinstance(m, QuantizedLinear) for m in model.modules()),
            "bpb": ev.get("overall", {}).get("bpb"),
            "components": {k: v["bpb"] for k, v in ev.get("components", {}).items()},
        })
    with timer("decode"):
        speeds = decode_speeds(models, min(m.cfg.vocab_size for m in models), cfg)
    for row, s in zip(rows, speeds, strict=True):
        row["tok_s"] = s
    components = sorted({c for r in rows for c in r["components"]})
    clear_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", {"rows": rows, "threads": torch.get_num_threads(), "dtype": cfg.dtype})
    text = report_markdown(rows, cfg.batch_sizes, components, cfg.split)
    atomic_write_text(out / "report.md", text)
    write_manifest(out, "compress report", cfg, inputs=runs, counts={"runs": len(runs)}, timings=timer.timings)
    log.info("compression report:\n%s", text)
    return out
