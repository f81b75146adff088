"""A model family is added without an edit of any other file: tests/models/toy_family.py
registers family "toy" (config, module, spec) and the real ``pilelm train`` trains it.

The family is registered in a child process, before pilelm.training is imported (as a family
folder under pilelm/models/ is, by ``import pilelm.models``), so this session's registry stays
the shipped one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pilelm.models.spec import ModelSpec, register

ROOT = Path(__file__).resolve().parents[2]


def _pilelm_with_toy(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys, toy_family; from pilelm.core.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "models"), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_toy_family_trains_through_the_real_cli(tiny_shards, tmp_path):
    out = tmp_path / "toy_run"
    done = _pilelm_with_toy(
        "train", "--data", str(tiny_shards), "-o", str(out), "family=toy", "toy.d_model=32", "toy.block_size=32",
        "loop.max_steps=8", "loop.micro_batch=8", "loop.log_every=1", "loop.eval_every=4", "loop.save_every=8",
        "loop.precision=fp32", "loop.device=cpu", "loop.tensorboard=false", "optim.lr=1e-2",
        "schedule.warmup_steps=0", "loop.peak_flops=1e12", "loop.num_threads=1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert any(r.get("val_loss") is not None for r in rows)
    saved = json.loads(next(out.glob("checkpoints/*/model.json")).read_text())
    assert saved["family"] == "toy" and saved["config"]["d_model"] == 32
    config = (out / "config.yaml").read_text()
    assert "family: toy" in config and "\ntoy:\n" in config


def test_the_toy_section_is_documented_and_checked_like_a_shipped_one():
    helped = _pilelm_with_toy("train", "--help")
    assert helped.returncode == 0
    assert "toy.d_model=16" in helped.stdout and "Width of the token embedding" in helped.stdout
    wrong = _pilelm_with_toy("train", "family=toy", "toy.width=3")
    assert wrong.returncode != 0
    assert "unknown config key 'toy.width'" in wrong.stderr and "toy.d_model" in wrong.stderr


def test_a_family_registered_after_the_train_config_is_refused_by_name():
    import pilelm.training.config  # noqa: F401  (builds the sections from the registry)
    from pilelm.models import families, get_spec

    late = ModelSpec(**{**get_spec("gpt").__dict__, "family": "late", "config_section": "late"})
    with pytest.raises(RuntimeError, match="'late' is registered too late.*before importing pilelm.training"):
        register(late)
    assert "late" not in families()


def test_a_family_folder_under_pilelm_models_registers_itself(tmp_path):
    # A copy of the package (code and configs) with one folder added: pilelm/models/toy/.
    import shutil

    copy = tmp_path / "pilelm"
    shutil.copytree(ROOT / "pilelm", copy, ignore=shutil.ignore_patterns("sample", "__pycache__", "static"))
    (copy / "models" / "toy").mkdir()
    shutil.copy(ROOT / "tests" / "models" / "toy_family.py", copy / "models" / "toy" / "__init__.py")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    helped = subprocess.run([sys.executable, "-m", "pilelm.core.cli", "train", "--help"], capture_output=True,
                            text=True, env=env, timeout=300, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "toy.d_model=16" in helped.stdout and "Width of the token embedding" in helped.stdout
