"""Experiment trackers beyond TensorBoard: MLflow and Weights & Biases, behind one small interface.

``loop.trackers=[mlflow, wandb]`` (both ``pilelm train`` and ``pilelm finetune``) sends every
row ``MetricsLog`` writes to metrics.jsonl to each tracker too, with the resolved config as the
run's parameters. Both work with no server and no network:

- ``mlflow``: a local store, the SQLite file ``RUN/mlflow.db`` (MLflow 3 keeps its plain-file
  store in maintenance mode; ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``), unless
  ``MLFLOW_TRACKING_URI`` names another; the experiment is ``pilelm``, the run is named after
  the output directory.
- ``wandb``: offline mode (``WANDB_MODE`` unless already set), files under ``RUN/wandb``;
  ``wandb sync RUN/wandb/offline-run-*`` uploads them later.

Each is an optional dependency (``pip install 'pilelm[track]'``); asking for one that is not
installed is an error saying so. A tracker is ``Tracker``: ``log(row, step)`` and ``close()``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("mlflow", "wandb")
MLFLOW_DB = "mlflow.db"


class Tracker(Protocol):
    def log(self, row: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"loop.trackers names {module}, which is not installed: pip install 'pilelm[track]' "
                         f"(or {module} alone)") from None


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


class MlflowTracker:
    def __init__(self, out: Path, config: dict[str, Any]):
        mlflow = _require("mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(out / MLFLOW_DB).resolve()}")
        mlflow.set_experiment("pilelm")
        self.run = mlflow.start_run(run_name=out.resolve().name)
        params = _flat(config)
        for start in range(0, len(params), 100):  # mlflow takes at most 100 params per call
            mlflow.log_params(dict(list(params.items())[start:start + 100]))

    def log(self, row: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(row, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, out: Path, config: dict[str, Any]):
        wandb = _require("wandb")
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project="pilelm", name=out.resolve().name, dir=str(out), config=config,
                              mode=os.environ["WANDB_MODE"], reinit="create_new")

    def log(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], out: Path, config: dict[str, Any]) -> list[Tracker]:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"loop.trackers: {unknown} unknown; use some of {', '.join(TRACKERS)}")
    out.mkdir(parents=True, exist_ok=True)
    makers = {"mlflow": MlflowTracker, "wandb": WandbTracker}
    return [makers[n](out, config) for n in dict.fromkeys(names)]


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, ``val_x`` as ``val/x`` and the rest as ``train/x``
    (the TensorBoard tags)."""
    return {(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
