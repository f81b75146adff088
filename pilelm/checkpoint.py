"""Saving and loading models and training state; never unpickles untrusted data.

Layout of a run directory (``pilelm train`` or ``pilelm import`` output):

    RUN/manifest.json             stage "train" or "import"
    RUN/tokenizer/tokenizer.json  the tokenizer the model was trained with
    RUN/checkpoints/step_00000100/
        model.safetensors         weights
        model.json                {"family": "gpt"|"bert", "config": {...}}
        ...                       training state (optimizer, loader, RNG) when saved by train
        COMPLETE                  written last: a directory without it is ignored
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pilelm.manifest import atomic_path, atomic_write_json, atomic_write_text, require_stage
from pilelm.models import build_model, config_from_spec, model_spec

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_model(ckpt_dir: str | Path, model: nn.Module, cfg: Any) -> None:
    """Write model.safetensors and model.json into ``ckpt_dir`` (each atomically)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights are stored once; safetensors refuses shared storage.
    state = {k: v.detach().cpu().contiguous() for k, v in _dedup_tied(model.state_dict()).items()}
    with atomic_path(ckpt_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(ckpt_dir / "model.json", model_spec(cfg))


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


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Build the model described by ``ckpt_dir/model.json`` and load its weights."""
    ckpt_dir = Path(ckpt_dir)
    spec = json.loads((ckpt_dir / "model.json").read_text())
    cfg = config_from_spec(spec)
    model = build_model(cfg)
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


def load_for_inference(
    run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode, its config, tokenizer directory) of a run's latest (or given) step."""
    run_dir = Path(run_dir)
    require_stage(run_dir, "train", "import", what="run")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"run {run_dir} has no completed checkpoint under {CHECKPOINTS}/")
    if step is None:
        ckpt = ckpts[-1][1]
    else:
        found = dict(ckpts).get(step)
        if found is None:
            raise FileNotFoundError(f"run {run_dir} has no checkpoint at step {step}; have {[s for s, _ in ckpts]}")
        ckpt = found
    model, cfg = load_model(ckpt, device)
    model.eval()
    return model, cfg, run_dir / "tokenizer"
