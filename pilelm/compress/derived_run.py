"""Writing a compressed model as a run directory, the layout every loader reads.

A compression stage's output is ``OUT/checkpoints/step_N/`` (N: the source checkpoint's step)
plus the source run's ``tokenizer/``; the stage writes its manifest after this.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from pilelm.training.checkpoint import checkpoint_dir, mark_complete, resolve_checkpoint, save_model
from pilelm.training.resume import discard_run, require_separate_output


def write_derived_run(source_run: str | Path, step: int | None, out: Path, model: nn.Module, cfg: Any,
                      tokenizer_dir: Path, extra_spec: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as ``out``'s one checkpoint and copy the tokenizer; returns the checkpoint
    folder. Whatever run ``out`` held is discarded first (its manifest before anything else)."""
    require_separate_output(source_run, out, "the run it reads")
    step, _ = resolve_checkpoint(source_run, step)
    ckpt = checkpoint_dir(out, step)
    discard_run(out, "a new model is written there")  # unfinished until the stage writes its manifest
    save_model(ckpt, model, cfg, extra_spec)
    mark_complete(ckpt)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    return ckpt

