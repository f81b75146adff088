"""RUN/metrics.jsonl, TensorBoard and optional trackers (MLflow, W&B): what a training run logs per step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_text


class MetricsLog:
    """RUN/metrics.jsonl (append; a resumed run first drops rows after its step) + TensorBoard."""

    def __init__(self, out: Path, step: int, enabled: bool, tensorboard: bool, trackers: list[str] | None = None,
                 config: Any = None):
        """``trackers``: MLflow / W&B names (``pilelm.training.trackers``), sent every row too
        with ``config`` (a config dataclass) as the run's parameters."""
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        self.trackers: list[Any] = []
        if not enabled:
            return
        if trackers:
            from pilelm.core.config import to_dict
            from pilelm.training.trackers import open_trackers

            self.trackers = open_trackers(list(trackers), out, to_dict(config) if config is not None else {})
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.trackers:
            from pilelm.training.trackers import scalars

            for tracker in self.trackers:
                tracker.log(scalars(row), int(row["step"]))
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key[4:]}",
                                       value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            for tracker in self.trackers:
                tracker.close()
