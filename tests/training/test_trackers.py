"""loop.trackers: MLflow (a local SQLite store) and W&B (offline) get the rows metrics.jsonl gets,
with the config as parameters; nothing leaves the machine."""

from __future__ import annotations

import pytest

from pilelm.training.metrics_log import MetricsLog
from pilelm.training.trackers import open_trackers, scalars

ROWS = [{"step": 10, "loss": 2.5, "lr": 1e-3}, {"step": 20, "loss": 2.0, "val_loss": 2.2, "note": "x"}]


def test_scalars_use_the_tensorboard_tags():
    assert scalars(ROWS[1]) == {"train/loss": 2.0, "val/loss": 2.2}


def test_unknown_tracker_is_an_error():
    with pytest.raises(ValueError, match="mlflow, wandb"):
        open_trackers(["comet"], __import__("pathlib").Path("/tmp"), {})


def test_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(tmp_path, 0, True, False, ["mlflow"], {"loop": {"max_steps": 20}, "optim": {"lr": 1e-3}})
    for row in ROWS:
        log.write(row)
    log.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pilelm").experiment_id])
    assert run.data.params["loop.max_steps"] == "20" and run.info.run_name == tmp_path.name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 2.0)]
    assert client.get_metric_history(run.info.run_id, "val/loss")[0].value == pytest.approx(2.2)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    log = MetricsLog(tmp_path, 0, True, False, ["wandb"], {"optim": {"lr": 1e-3}})
    for row in ROWS:
        log.write(row)
    log.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("*.wandb")  # what `wandb sync` would upload
    data = records.read_bytes()
    # wandb 0.31 ships no reader for its record log; the rows' keys and values are stored as text
    assert data.count(b"train/loss") >= 2 and b"val/loss" in data and b"2.2" in data
    assert b"optim" in data  # the config
