"""`pilelm prune`: magnitude pruning zeroes exactly the smallest weights; structured pruning
removes heads and channels without changing what the kept ones compute."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pilelm.compress.importance import channel_importance, head_importance
from pilelm.compress.prune import (
    PruneConfig,
    keep_top,
    magnitude_prune,
    run_prune,
    structured_prune,
)
from pilelm.core import cli
from pilelm.inference.generate import GenerateConfig, SamplingParams, run_generate, stream_batch
from pilelm.interop.hf import ExportConfig, run_export
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training.checkpoint import load_for_inference

# The cpu-10min recipe's form (Qwen3's): RMSNorm, SwiGLU (fc holds gate and value rows), gained QK-norm.
RECIPE = dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, qk_norm_gain=True, rotary_pct=1.0, parallel_residual=False,
              bias=False)


def _model(arch: str = "gpt2", seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(arch=arch, vocab_size=96, block_size=48, n_layer=2, n_head=4, d_model=64, tie_embeddings=False,
                    **options)
    model = GPT(cfg).eval()
    with torch.no_grad():  # biases are zero at init; make them matter
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_the_smallest_weights_and_keeps_the_rest(scope):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frac = magnitude_prune(model, 0.6, scope)
    assert frac == pytest.approx(0.6, abs=0.01)
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept_min, pruned_max = [], []
    for name in layers:
        w, w0 = model.get_submodule(name).weight, before[name + ".weight"]
        zero = w == 0
        assert torch.equal(w[~zero], w0[~zero])  # survivors untouched
        if scope == "layer":
            assert zero.float().mean() == pytest.approx(0.6, abs=0.01)
        kept_min.append(w0[~zero].abs().min())
        pruned_max.append(w0[zero].abs().max())
    if scope == "global":  # one threshold: every pruned weight is smaller than every kept one
        assert max(pruned_max) <= min(kept_min)
    assert torch.equal(model.wte.weight, before["wte.weight"])  # embeddings are not pruned


@pytest.mark.parametrize("arch", ["gpt2", "neox", "recipe"])
def test_removed_heads_and_channels_do_not_change_the_kept_ones(arch):
    model = _model("neox", **RECIPE) if arch == "recipe" else _model(arch)
    ffn = model.cfg.ffn_size  # 256; SwiGLU: 192
    small = structured_prune(model, heads=0.5, channels=0.25)
    assert small.cfg.n_head == 2 and small.cfg.head_dim == 16 and small.cfg.ffn_size == ffn - ffn // 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 7, 64)
    rope = model.rotary(torch.arange(7)[None].expand(2, 7), x.dtype) if model.rotary is not None else None
    for i, (block, pblock) in enumerate(zip(model.blocks, small.blocks, strict=True)):
        # The original block with the removed heads' and channels' outputs zeroed...
        masked = copy.deepcopy(block)
        dropped_cols = torch.ones(64, dtype=torch.bool)
        for h in keep_top(head_importance(model, i), 2):
            dropped_cols[h * 16 : (h + 1) * 16] = False
        dropped_channels = torch.ones(ffn, dtype=torch.bool)
        dropped_channels[keep_top(channel_importance(model, i), ffn - ffn // 4)] = False
        with torch.no_grad():
            masked.attn.proj.weight[:, dropped_cols] = 0
            masked.mlp.proj.weight[:, dropped_channels] = 0
            want = masked(x, rope, None, 0, None)
            got = pblock(x, rope, None, 0, None)
        # ...computes exactly what the pruned block computes.
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_head_pruned_model_decodes_with_its_cache_like_its_full_forward():
    small = structured_prune(_model("neox"), heads=0.5, channels=0.5)
    prompts = [[5, 6, 7, 8, 9], [12, 13]]
    with torch.inference_mode():
        steps = list(stream_batch(small, prompts, [SamplingParams(max_new_tokens=6, temperature=0.0)] * 2, eos_id=None))
        for row, prompt in enumerate(prompts):
            ids = list(prompt)
            for _ in range(6):
                ids.append(int(small(torch.tensor([ids]))[0][0, -1].argmax()))
            assert [s[row] for s in steps] == ids[len(prompt):]


def test_prune_stage_round_trip_and_export_rules(tiny_run, tmp_path):
    out = run_prune(PruneConfig(run=str(tiny_run), output=str(tmp_path / "p"), heads=0.5, channels=0.5))
    model, cfg, _ = load_for_inference(out)
    assert cfg.n_head == 1 and cfg.head_dim == 32
    texts: list[str] = []
    run_generate(GenerateConfig(run=str(out), prompt=["the"], sampling=SamplingParams(max_new_tokens=4, temperature=0.0)), texts.append)
    assert "".join(texts).startswith("the")
    with pytest.raises(ValueError, match="heads were pruned"):
        run_export(ExportConfig(run=str(out), output=str(tmp_path / "hf")))
    # MLP channels only: still a transformers model.
    mlp_only = run_prune(PruneConfig(run=str(tiny_run), output=str(tmp_path / "m"), heads=0.0, channels=0.5))
    run_export(ExportConfig(run=str(mlp_only), output=str(tmp_path / "hf2")))
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["n_inner"] == 128


def test_prune_command_line(tiny_run, tmp_path):
    out = tmp_path / "mag"
    assert cli.main(["prune", str(tiny_run), "-o", str(out), "--method", "magnitude", "--sparsity", "0.3"]) in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prune" and manifest["counts"]["zero_fraction"] == pytest.approx(0.3, abs=0.01)
    assert cli.main(["prune", str(tiny_run), "-o", str(out), "--sparsity", "1.5"]) != 0


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_structured_pruning_with_a_recovery_fine_tune(tiny_run, tiny_shards, tmp_path):
    """The fine-tune is the trainer's loop from the pruned weights: OUT/pruned keeps the pruned
    model, OUT the recovered one (same smaller shape, lower training loss than it started at),
    and the manifest is prune's."""
    cfg = PruneConfig(run=str(tiny_run), output=str(tmp_path / "out"), heads=0.5, channels=0.5,
                      recovery_steps=8, data=str(tiny_shards), recovery_lr=3e-3, recovery_micro_batch=4)
    out = run_prune(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prune" and manifest["counts"]["steps"] == 8
    assert manifest["counts"]["parameters"] < manifest["counts"]["parameters_before"]
    pruned, pcfg, _ = load_for_inference(out / "pruned")
    recovered, rcfg, _ = load_for_inference(out)
    assert rcfg == pcfg and rcfg.n_head == 1
    assert not torch.equal(pruned.blocks[0].mlp.fc.weight, recovered.blocks[0].mlp.fc.weight)
    losses = _losses(out)
    assert losses[-1] < losses[0]
    # Rerunning the finished command changes nothing.
    step_dirs = sorted(p.name for p in (out / "checkpoints").iterdir())
    run_prune(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == step_dirs


def test_magnitude_pruned_zeros_stay_zero_through_recovery(tiny_run, tiny_shards, tmp_path):
    out = run_prune(PruneConfig(run=str(tiny_run), output=str(tmp_path / "out"), method="magnitude",
                                sparsity=0.5, recovery_steps=4, data=str(tiny_shards), recovery_lr=3e-3,
                                recovery_micro_batch=4))
    pruned, _, _ = load_for_inference(out / "pruned")
    recovered, _, _ = load_for_inference(out)
    moved = 0
    for name, mod in pruned.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            zero = mod.weight == 0
            after = recovered.get_submodule(name).weight
            assert zero.float().mean() > 0.2
            assert torch.all(after[zero] == 0)
            moved += int((after[~zero] != mod.weight[~zero]).sum())
    assert moved > 0
    # The same output, another sparsity: a new pruned model and a new fine-tune of it, not the old ones.
    run_prune(PruneConfig(run=str(tiny_run), output=str(out), method="magnitude", sparsity=0.8, recovery_steps=4,
                          data=str(tiny_shards), recovery_lr=3e-3, recovery_micro_batch=4))
    assert json.loads((out / "pruned" / "manifest.json").read_text())["counts"]["zero_fraction"] == pytest.approx(0.8, abs=0.01)
    assert json.loads((out / "manifest.json").read_text())["config"]["sparsity"] == 0.8
    recovered, _, _ = load_for_inference(out)
    weights = [m.weight for n, m in recovered.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) > 0.75


def test_recovery_needs_data():
    with pytest.raises(ValueError, match="recovery_steps needs the token shards"):
        PruneConfig(run="r", output="o", recovery_steps=5)
