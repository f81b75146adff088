"""The runs ``pilelm eval`` compares: run or checkpoint directories -> (display name, run, step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pilelm.core.manifest import require_stage
from pilelm.training.checkpoint import RUN_STAGES, list_checkpoints, resolve_checkpoint, split_checkpoint_path


@dataclass
class RunSpec:
    name: str
    run_dir: Path
    step: int


def resolve_runs(specs: list[str], all_checkpoints: bool) -> list[RunSpec]:
    """Run dirs or checkpoint dirs -> (display name, run dir, step) with unique names."""
    out: list[RunSpec] = []
    for spec in specs:
        path, step = split_checkpoint_path(spec)
        require_stage(path, *RUN_STAGES, what="run")
        if step is not None:
            out.append(RunSpec(f"{path.name}@{step}", path, step))
            continue
        newest, _ = resolve_checkpoint(path)  # raises when the run has no usable checkpoint
        if all_checkpoints:
            out += [RunSpec(f"{path.name}@{step}", path, step) for step, _ in list_checkpoints(path)]
        else:
            out.append(RunSpec(path.name, path, newest))
    names = [r.name for r in out]
    for r in out:
        if names.count(r.name) > 1:
            r.name = f"{r.run_dir.parent.name}/{r.name}"
    if len({r.name for r in out}) < len(out):
        raise ValueError(f"the runs to compare must differ; got {specs}")
    return out
