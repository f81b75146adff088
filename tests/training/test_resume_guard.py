"""A run directory resumes only with the config and data it started with: a change is refused
with the difference named, ``--restart`` trains anew, and the pipeline runner retrains."""

from __future__ import annotations

import shutil

import pytest
from test_train import losses, make_shards, tiny_config

from pilelm.core.manifest import MANIFEST, read_manifest
from pilelm.training.trainer import load_run_config, run_train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_a_changed_config_is_refused_naming_the_difference(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    with pytest.raises(ValueError, match=r"(?s)optim\.lr: 0\.003 -> 0\.05.*--restart"):
        run_train(tiny_config(shards, run, **{"loop.max_steps": 4, "optim.lr": 0.05}))
    # Stopped part-way (as a preempted job): a changed config is refused as well.
    part = run_train(tiny_config(shards, tmp_path / "part", **{"loop.stop_at_step": 4}))
    with pytest.raises(ValueError, match=r"model\.n_layer: 2 -> 1"):
        run_train(tiny_config(shards, part, **{"model.n_layer": 1}))
    # What only changes how far or how visibly the run goes is not a difference.
    run_train(tiny_config(shards, part, **{"loop.log_every": 2, "loop.keep_last": 3}))
    assert read_manifest(part)["counts"]["steps"] == 8


def test_changed_data_is_refused(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    moved = shutil.copytree(shards, tmp_path / "moved")  # the same data elsewhere: fine
    run_train(tiny_config(moved, run, **{"loop.max_steps": 4}))
    other = make_shards(tmp_path / "other", n_train=100)  # new shards of the same vocabulary
    with pytest.raises(ValueError, match=r"data: the token shards changed"):
        run_train(tiny_config(other, run, **{"loop.max_steps": 4}))


def test_restart_trains_anew_with_the_new_config(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    run_train(tiny_config(shards, run, **{"loop.max_steps": 4, "optim.lr": 0.05, "restart": True}))
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # a new run, not appended to the old one
    assert load_run_config(run).optim.lr == 0.05 and not load_run_config(run).restart
    assert read_manifest(run)["config"]["optim"]["lr"] == 0.05


def test_training_on_drops_the_finished_manifest(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    run_train(tiny_config(shards, run, **{"loop.max_steps": 8, "loop.stop_at_step": 6}))
    assert not (run / MANIFEST).exists()  # steps 5-6 exist, the manifest said 4: unfinished now


def test_the_pipeline_runner_retrains_after_a_config_or_data_change(shards, tmp_path):
    from pilelm.core.runner import execute, plan_pipeline

    stage = {"stage": "train", "data": str(shards), "output": "run",
             "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32},
             "schedule": {"warmup_steps": 1},
             "loop": {"max_steps": 3, "micro_batch": 4, "eval_every": 0, "save_every": 3, "num_threads": 1,
                      "precision": "fp32", "peak_flops": 1e12, "tensorboard": False}}
    work = tmp_path / "work"

    def run(overrides=None, data=None):
        entry = dict(stage, data=str(data or shards))
        return [r.status for r in execute(plan_pipeline({"stages": [entry]}, work, overrides))]

    assert run() == ["ran"]
    assert run() == ["skipped"]
    assert run({"train": {"optim": {"lr": 0.05}}}) == ["ran"]
    assert load_run_config(work / "run").optim.lr == 0.05
    assert [s for s, _ in losses(work / "run")] == [3]  # one run, not the old one continued
    assert run({"train": {"optim": {"lr": 0.05}}}) == ["skipped"]
    other = make_shards(tmp_path / "other", n_train=100)
    assert run({"train": {"optim": {"lr": 0.05}}}, data=other) == ["ran"]
    assert read_manifest(work / "run")["inputs"][0]["path"] == str(other)
