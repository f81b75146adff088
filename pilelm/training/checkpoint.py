"""Saving and loading models and training state; never unpickles untrusted data.

Layout of a run directory (``pilelm train`` or ``pilelm import`` output):

    RUN/manifest.json             stage "train" or "import" (or a compression stage: RUN_STAGES)
    RUN/tokenizer/tokenizer.json  the tokenizer the model was trained with
    RUN/checkpoints/step_00000100/
        model.safetensors         weights
        model.json                {"family": NAME, "config": {...}} (pilelm/models/spec.py;
                                  + WEIGHT_FORMATS keys for compressed weights)
        train_state.pt            training state saved by train: step, optimizer, loader
                                  position, tokens seen (``torch.load(weights_only=True)``)
        rng_rank{R}.pt            each rank's torch (and CUDA) RNG state
        checksums.json            size and sha256 of every file above
        COMPLETE                  written last: a directory without it is ignored

A checkpoint whose files do not match ``checksums.json`` (a disk error, a copy cut short) is
reported and skipped: resuming, ``init_from`` and ``load_for_inference`` fall back to the
previous intact one.

This module is the one owner of "which checkpoint": the step-folder pattern, listing
(``list_checkpoints``), the newest intact one (``find_resumable``), a run's given or newest
(``resolve_checkpoint``) and a path that may be a run or one of its checkpoints
(``split_checkpoint_path``). Other code asks these instead of globbing ``step_*``.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pilelm.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from pilelm.core.hashing import file_sha256
from pilelm.core.manifest import require_stage
from pilelm.models import build_model, config_from_spec, model_spec

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Stages whose output is a run directory (this layout) that eval, generate and serve load.
RUN_STAGES = ("train", "import", "distill", "prune", "quantize")
# model.json entries that say the stored weights are not the plain model's, and the function
# (module:name, imported by name since compression sits above training) that rebuilds the
# model's modules to take them before the weights load.
QUANTIZATION_KEY = "quantization"
WEIGHT_FORMATS = {QUANTIZATION_KEY: "pilelm.compress.quantize:rebuild_quantized"}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where a run's checkpoint of ``step`` lives: RUN/checkpoints/step_XXXXXXXX."""
    return Path(run_dir) / CHECKPOINTS / step_dir_name(step)


def split_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
    """A run directory -> (it, None); one of its checkpoint folders RUN/checkpoints/step_N -> (RUN, N)."""
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    if m and path.parent.name == CHECKPOINTS:
        return path.parent.parent, int(m.group(1))
    return path, None


def save_model(ckpt_dir: str | Path, model: nn.Module, cfg: Any, extra_spec: dict[str, Any] | None = None) -> None:
    """Write model.safetensors and model.json into ``ckpt_dir`` (each atomically);
    ``extra_spec`` adds entries to model.json (e.g. ``WEIGHT_FORMATS`` keys)."""
    save_weights(ckpt_dir, model.state_dict(), cfg, extra_spec)


def save_weights(ckpt_dir: str | Path, state_dict: dict[str, torch.Tensor], cfg: Any,
                 extra_spec: dict[str, Any] | None = None) -> None:
    """``save_model`` from a state dict (e.g. one gathered from FSDP shards)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights are stored once; safetensors refuses shared storage.
    state = {k: v.detach().cpu().contiguous() for k, v in _dedup_tied(state_dict).items()}
    with atomic_path(ckpt_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(ckpt_dir / "model.json", model_spec(cfg) | (extra_spec or {}))


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        key = v.data_ptr()
        if key in seen and v.numel() > 0:
            continue
        seen[key] = k
        out[k] = v
    return out


def stored_weight_formats(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``WEIGHT_FORMATS`` entries of a checkpoint's model.json: {} for plain weights."""
    spec = json.loads((Path(ckpt_dir) / "model.json").read_text())
    return {k: spec[k] for k in WEIGHT_FORMATS if k in spec}


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Build the model described by ``ckpt_dir/model.json`` and load its weights."""
    ckpt_dir = Path(ckpt_dir)
    spec = json.loads((ckpt_dir / "model.json").read_text())
    cfg = config_from_spec(spec)
    model = build_model(cfg)
    for key, target in WEIGHT_FORMATS.items():
        if key in spec:
            module, name = target.split(":")
            getattr(importlib.import_module(module), name)(model, spec[key])
    state = load_file(str(ckpt_dir / "model.safetensors"), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The only keys allowed to be missing are tied copies of stored weights.
    tied = {k for k in missing if _is_tied_alias(model, k, state)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{ckpt_dir}: weights do not match the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.to(device), cfg


def _is_tied_alias(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    target = params[key]
    return any(k in state and params.get(k) is target for k in params if k != key)


def mark_complete(ckpt_dir: str | Path) -> None:
    atomic_write_text(Path(ckpt_dir) / COMPLETE, "ok\n")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[int, Path]:
    """(step, folder) of a run's checkpoint at ``step`` (it must be complete), or of its newest
    intact one (damaged ones are reported and skipped)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"run {run_dir} has no completed checkpoint under {CHECKPOINTS}/")
    if step is not None:
        found = dict(ckpts).get(step)
        if found is None:
            raise FileNotFoundError(f"run {run_dir} has no checkpoint at step {step}; have {[s for s, _ in ckpts]}")
        return step, found
    newest = find_resumable(run_dir, train_state=False)
    if newest is None:
        raise FileNotFoundError(f"run {run_dir}: every checkpoint is damaged; see the warnings above")
    return newest


def resolve_init_checkpoint(src: Path) -> tuple[Path, Path]:
    """``init_from``: (checkpoint folder, its run directory) of a checkpoint folder (one holding
    model.json, checked intact) or of a run directory (its newest intact checkpoint)."""
    if (src / "model.json").is_file():
        problem = verify_checkpoint(src)
        if problem:
            raise ValueError(f"init_from: {src} is not an intact checkpoint ({problem})")
        return src, src.parent.parent
    found = find_resumable(src, train_state=False) if src.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"init_from: {src} holds no intact checkpoint (RUN/{CHECKPOINTS}/step_*/); "
                                "give a run directory such as `pilelm import`'s output, or a checkpoint folder")
    return found[1], src


def load_for_inference(
    run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode, its config, tokenizer directory) of a run's latest (or given) step;
    ``device="auto"`` is cuda where there is one, else the CPU."""
    run_dir = Path(run_dir)
    require_stage(run_dir, *RUN_STAGES, what="run")
    if device == "auto":
        from pilelm.training.distributed import pick_device

        device = pick_device("auto")
    _, ckpt = resolve_checkpoint(run_dir, step)
    model, cfg = load_model(ckpt, device)
    model.eval()
    return model, cfg, run_dir / "tokenizer"


# --- training state ---------------------------------------------------------------------

TRAIN_STATE = "train_state.pt"
CHECKSUMS = "checksums.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path) -> Any:
    """Tensors, numbers, strings, lists and dicts only: never arbitrary pickled objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def finalize_checkpoint(ckpt_dir: str | Path) -> None:
    """Record the size and sha256 of every file, then write COMPLETE (last)."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name not in (COMPLETE, CHECKSUMS)
                   and not p.name.startswith("."))
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    atomic_write_json(ckpt_dir / CHECKSUMS, sums)
    mark_complete(ckpt_dir)


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        return "no COMPLETE marker: it was being written when the run stopped"
    for name in ("model.safetensors", "model.json"):
        if not (ckpt_dir / name).is_file():
            return f"{name} is missing"
    if not (ckpt_dir / CHECKSUMS).is_file():
        return None  # written by save_model + mark_complete (e.g. pilelm import): nothing to check
    try:
        sums = json.loads((ckpt_dir / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name, want in sums.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, {want['bytes']} were written"
        if file_sha256(p) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all), and unfinished ones
    older than the newest complete checkpoint."""
    ckpts = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, p in ckpts[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    if ckpts:
        newest = ckpts[-1][0]
        for p in (Path(run_dir) / CHECKPOINTS).iterdir():
            m = _STEP_DIR.match(p.name)
            if m and int(m.group(1)) < newest and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)


def find_resumable(run_dir: str | Path, train_state: bool = True) -> tuple[int, Path] | None:
    """The newest intact checkpoint of a run, reporting (and skipping) damaged ones; with
    ``train_state`` it must also hold the optimizer and loader state to resume from (weights
    alone, as `pilelm import` writes, are enough to start a run from)."""
    for step, ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None and train_state and not (ckpt / TRAIN_STATE).is_file():
            problem = f"{TRAIN_STATE} is missing"
        if problem is None:
            return step, ckpt
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", ckpt, problem)
    return None
