"""Importance scores of structured pruning: Taylor (sum |w * dL/dw|) and mean activation on
calibration batches; what they rank last is what a masked full model does without."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pilelm.compress.importance import activation_scores, calibration_batches, taylor_scores
from pilelm.compress.prune import PruneConfig, keep_top, run_prune, structured_prune
from pilelm.core import cli
from pilelm.models.gpt import GPT
from pilelm.training.checkpoint import load_for_inference
from tests.compress.test_prune import _model

NH, HS, FF = 4, 16, 256


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, 96, (2, 17), generator=g) for _ in range(n))]


def _masked(model: GPT, small: GPT, scores) -> GPT:
    """``model`` with the heads and channels ``structured_prune`` removed zeroed at their outputs."""
    masked = copy.deepcopy(model)
    nh_keep, ff_keep = small.cfg.n_head, small.cfg.ffn_size
    with torch.no_grad():
        for block, (heads, channels) in zip(masked.blocks, scores, strict=True):
            dropped_cols = torch.ones(NH * HS, dtype=torch.bool)
            for h in keep_top(heads, nh_keep):
                dropped_cols[h * HS : (h + 1) * HS] = False
            dropped_channels = torch.ones(FF, dtype=torch.bool)
            dropped_channels[keep_top(channels, ff_keep)] = False
            block.attn.proj.weight[:, dropped_cols] = 0
            block.mlp.proj.weight[:, dropped_channels] = 0
    return masked


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_a_head_and_channel_without_output_have_zero_taylor_importance_and_go_first(arch):
    model = _model(arch).requires_grad_(False)  # as loaded for inference: gradients come on and off
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 2 * HS : 3 * HS] = 0  # head 2 of block 0 writes nothing
        model.blocks[1].mlp.proj.weight[:, 7] = 0  # channel 7 of block 1 writes nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = taylor_scores(model, _batches())
    assert scores[0][0][2] == 0 and (scores[0][0][[0, 1, 3]] > 0).all()
    assert scores[1][1][7] == 0 and (scores[1][1] > 0).sum() == FF - 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights untouched
    assert all(p.grad is None and not p.requires_grad for p in model.parameters()) and not model.training

    small = structured_prune(model, heads=0.25, channels=0.25, scores=scores)
    assert torch.equal(keep_top(scores[0][0], NH - 1), torch.tensor([0, 1, 3]))  # head 2 goes first
    assert 7 not in keep_top(scores[1][1], FF - 1).tolist()  # and so does channel 7
    x = torch.randint(0, 96, (2, 11))
    with torch.no_grad():  # the smaller model is the full one with the removed units masked
        torch.testing.assert_close(small(x)[0], _masked(model, small, scores)(x)[0], atol=1e-5, rtol=1e-5)


def test_a_silent_head_and_channel_have_zero_activation_importance():
    model = _model()
    with torch.no_grad():
        v_rows = slice(2 * NH * HS + 1 * HS, 2 * NH * HS + 2 * HS)  # head 1's value rows
        model.blocks[1].attn.qkv.weight[v_rows] = 0
        model.blocks[1].attn.qkv.bias[v_rows] = 0  # head 1 of block 1 attends to zeros
        model.blocks[0].mlp.fc.weight[5] = 0
        model.blocks[0].mlp.fc.bias[5] = -20.0  # gelu(-20) == 0: channel 5 of block 0 is silent
    scores = activation_scores(model, _batches())
    assert scores[1][0][1] == 0 and (scores[1][0][[0, 2, 3]] > 0).all()
    assert scores[0][1][5] < 1e-30 and (scores[0][1] > 0).sum() >= FF - 1
    assert 1 not in keep_top(scores[1][0], NH - 1).tolist()
    small = structured_prune(model, heads=0.5, channels=0.5, scores=scores)
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], _masked(model, small, scores)(x)[0], atol=1e-5, rtol=1e-5)


def test_taylor_scores_add_up_over_batches():
    model = _model()
    batches = _batches(3)
    whole = taylor_scores(model, batches)
    parts = [taylor_scores(model, [b]) for b in batches]
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(whole[i][j], sum(p[i][j] for p in parts))


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_prune_stage_with_data_driven_importance(tiny_run, tiny_shards, tmp_path, importance):
    out = tmp_path / importance
    args = ["prune", str(tiny_run), "-o", str(out), "--heads", "0.5", "--channels", "0.5", "--importance", importance,
            "--data", str(tiny_shards), "--calibration-batches", "2", "--calibration-batch-size", "2",
            "--calibration-seq-len", "16"]
    assert cli.main(args) in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["importance"] == importance
    _, cfg, _ = load_for_inference(out)
    assert cfg.n_head == 1
    batches = calibration_batches(tiny_shards, 16, 2, 2)
    assert len(batches) == 2 and batches[0][0].shape == (2, 16)
    assert torch.equal(batches[0][1][:, :-1], batches[0][0][:, 1:])


def test_taylor_pruning_with_a_recovery_fine_tune(tiny_run, tiny_shards, tmp_path):
    out = run_prune(PruneConfig(run=str(tiny_run), output=str(tmp_path / "out"), heads=0.5, channels=0.5,
                                importance="taylor", data=str(tiny_shards), calibration_batches=1,
                                calibration_batch_size=2, calibration_seq_len=16, recovery_steps=2,
                                recovery_micro_batch=2))
    assert json.loads((out / "pruned" / "manifest.json").read_text())["config"]["importance"] == "taylor"
    _, cfg, _ = load_for_inference(out)
    assert cfg.n_head == 1


def test_data_driven_importance_needs_data_and_structured_pruning():
    with pytest.raises(ValueError, match="importance=taylor .*--data"):
        PruneConfig(run="r", output="o", importance="taylor")
    with pytest.raises(ValueError, match="method=structured"):
        PruneConfig(run="r", output="o", method="magnitude", importance="activation", data="d")
    with pytest.raises(ValueError, match="importance must be one of"):
        PruneConfig(run="r", output="o", importance="fisher")
