"""The shipped quality-per-compute recipes: cpu-10min trains to its time budget (a fake clock),
every ablation lever of benchmarks/quality_10min.py is a valid change of it, gpt2-124m uses
the recipe, and the GPU check skips cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_budget import FakeClock
from test_train import make_shards

from pilelm.core.config import load_config
from pilelm.core.stages import resolve_config_path
from pilelm.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32},
        "loop": {"micro_batch": 4, "num_threads": 1, "precision": "fp32", "peak_flops": 1e12, "tensorboard": False,
                 "eval_windows": 8}}


def recipe(name: str, data: Path, out: Path, **sections) -> TrainConfig:
    over = {"data": str(data), "output": str(out)}
    for section, values in {**TINY, **sections}.items():
        over[section] = {**TINY.get(section, {}), **values}
    return load_config(TrainConfig, resolve_config_path(name), overrides=over)


def test_cpu_10min_trains_to_its_time_budget(tmp_path):
    shards = make_shards(tmp_path / "shards")
    cfg = recipe("cpu-10min", shards, tmp_path / "run", schedule={"warmup_steps": 2}, loop={"log_every": 1})
    assert cfg.loop.max_minutes == 10 and cfg.schedule.kind == "wsd" and cfg.optim.name == "muon"
    t = Trainer(cfg)
    FakeClock(t, per_step=60.0)  # a minute per step: ten steps
    t.fit()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 10 and manifest["counts"]["val_bpb"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["lr"] < rows[4]["lr"]  # decayed in the last 40 %


def _benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_10min", ROOT / "benchmarks" / "quality_10min.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_ablation_lever_is_a_valid_change_of_cpu_10min(monkeypatch):
    bench = _benchmark(monkeypatch)
    base = load_config(TrainConfig, resolve_config_path("cpu-10min"))
    for lever, change in bench.LEVERS.items():
        if bench.VOCAB_KEY in change:  # a data lever: the same config on another BPE's shards
            assert set(change) == {bench.VOCAB_KEY} and change[bench.VOCAB_KEY] != bench.VOCAB, lever
            continue
        cfg = load_config(TrainConfig, resolve_config_path("cpu-10min"), overrides=change)
        assert cfg != base, lever


def test_gpt2_124m_uses_the_recipe():
    cpu = load_config(TrainConfig, resolve_config_path("cpu-10min"))
    gpu = load_config(TrainConfig, resolve_config_path("gpt2-124m"))
    for key in ("arch", "qk_norm", "qk_norm_gain", "norm", "mlp", "logit_softcap", "tie_embeddings", "rotary_pct"):
        assert getattr(gpu.model, key) == getattr(cpu.model, key), key
    assert (gpu.optim.name, gpu.schedule.kind, gpu.loop.window_start) == ("muon", "wsd", "document")
    assert (gpu.model.n_layer, gpu.model.d_model, gpu.model.block_size) == (12, 768, 1024) and gpu.loop.compile


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_gpu_check_skips_cleanly_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train_check.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "skipped: no CUDA device" in done.stdout
