import logging

import pytest
import torch

from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training import checkpoint


def _run_with_checkpoints(tmp_path, steps):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
    model = GPT(cfg)
    for step in steps:
        ckpt = checkpoint.checkpoint_dir(tmp_path, step)
        checkpoint.save_model(ckpt, model, cfg)
        checkpoint.finalize_checkpoint(ckpt)
    return tmp_path


def test_resolve_checkpoint_gives_the_asked_step_or_the_newest_intact_one(tmp_path, caplog):
    run = _run_with_checkpoints(tmp_path, [2, 4])
    assert checkpoint.resolve_checkpoint(run) == (4, run / "checkpoints" / "step_00000004")
    assert checkpoint.resolve_checkpoint(run, 2) == (2, run / "checkpoints" / "step_00000002")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; have \[2, 4\]"):
        checkpoint.resolve_checkpoint(run, 3)
    (run / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"cut short")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_checkpoint(run)[0] == 2
    assert any("step_00000004" in r.message and "damaged" in r.message for r in caplog.records)
    (run / "checkpoints" / "step_00000002" / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="every checkpoint is damaged"):
        checkpoint.resolve_checkpoint(run)
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        checkpoint.resolve_checkpoint(tmp_path / "empty")


def test_a_path_is_a_run_or_one_of_its_checkpoints(tmp_path):
    assert checkpoint.split_checkpoint_path(tmp_path) == (tmp_path, None)
    assert checkpoint.split_checkpoint_path(checkpoint.checkpoint_dir(tmp_path, 7)) == (tmp_path, 7)
    assert checkpoint.split_checkpoint_path(tmp_path / "step_00000007") == (tmp_path / "step_00000007", None)


def test_init_from_takes_a_run_or_an_intact_checkpoint_folder(tmp_path):
    run = _run_with_checkpoints(tmp_path, [1, 3])
    newest = run / "checkpoints" / "step_00000003"
    assert checkpoint.resolve_init_checkpoint(run) == (newest, run)
    older = run / "checkpoints" / "step_00000001"
    assert checkpoint.resolve_init_checkpoint(older) == (older, run)
    (older / checkpoint.COMPLETE).unlink()
    with pytest.raises(ValueError, match="not an intact checkpoint"):
        checkpoint.resolve_init_checkpoint(older)
    with pytest.raises(FileNotFoundError, match="holds no intact checkpoint"):
        checkpoint.resolve_init_checkpoint(tmp_path / "nothing")
