"""What a training step and a finished run report: the step's numbers, the non-finite stop,
and the manifest entry a ``Trainer`` subclass (``pilelm distill``, prune's recovery) overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient (loop.on_nonfinite=stop)."""


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


class ManifestEntry(NamedTuple):
    """The stage name, config, inputs and extra counts of a finished run's manifest (a
    ``Trainer`` subclass that is another stage, e.g. ``pilelm distill``, says its own)."""

    stage: str
    config: Any
    inputs: list[str]
    counts: dict[str, Any] = {}
