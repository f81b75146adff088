"""The quality-per-compute options of the GPT model: QK-norm, ReLU^2 / SwiGLU MLPs, logit
soft-capping, z-loss, untied head. Each is off by default (the plain models stay exact), each
changes what it claims, the fused loss equals the unfused one with them (decoding follows
the forward: tests/models/test_gpt.py), and export refuses what transformers cannot express."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pilelm.interop.gpt2_neox import gpt_hf_config
from pilelm.models.fused_ce import linear_cross_entropy, reference_cross_entropy
from pilelm.models.gpt import GPT, GPTConfig

SHAPE = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64)


def model_with(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SHAPE, **kw))


def test_defaults_are_the_plain_families():
    cfg = GPTConfig(**SHAPE)
    assert cfg.standard and not cfg.qk_norm and cfg.mlp == "gelu" and cfg.logit_softcap == 0 and cfg.z_loss == 0
    # Same seed, same parameters as before the options existed: nothing new is drawn.
    names = [n for n, _ in model_with().named_parameters()]
    assert not any("norm" in n and "ln" not in n for n in names)


@pytest.mark.parametrize("softcap,z_loss", [(0.0, 1e-3), (5.0, 0.0), (5.0, 1e-2)])
def test_fused_loss_with_softcap_and_z_loss_equals_the_unfused_one(softcap, z_loss):
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 2).requires_grad_()
    t = torch.randint(0, 50, (40,))
    t[::7] = -100
    fused = linear_cross_entropy(x, w, t, chunk=16, softcap=softcap, z_loss=z_loss)
    gx, gw = torch.autograd.grad(fused, (x, w))
    ref = reference_cross_entropy(x, w, t, softcap=softcap, z_loss=z_loss)
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    if z_loss:  # the z-loss adds a positive term
        assert ref > reference_cross_entropy(x, w, t, softcap=softcap)


def test_softcap_bounds_the_logits_and_z_loss_is_training_only():
    model = model_with(logit_softcap=2.0, z_loss=0.1)
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # huge raw logits
    idx = torch.randint(0, 97, (2, 12))
    logits, _ = model.eval()(idx)
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    targets = torch.randint(0, 97, (2, 12))
    _, eval_loss = model(idx, targets)
    torch.testing.assert_close(eval_loss, F.cross_entropy(logits.view(-1, 97), targets.view(-1)))
    _, train_loss = model.train()(idx, targets)
    assert train_loss > eval_loss + 0.1  # plus 0.1 * logsumexp^2


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    a, b = model_with(qk_norm=True).eval(), model_with(qk_norm=True).eval()
    with torch.no_grad():
        C = 64
        b.blocks[0].attn.qkv.weight[: 2 * C].mul_(7.0)  # queries and keys x7; values unchanged
        if b.blocks[0].attn.qkv.bias is not None:
            b.blocks[0].attn.qkv.bias[: 2 * C].mul_(7.0)
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-4, rtol=1e-4)
    plain, scaled = model_with().eval(), model_with().eval()
    with torch.no_grad():
        scaled.blocks[0].attn.qkv.weight[: 2 * C].mul_(7.0)
    assert not torch.allclose(plain(idx)[0], scaled(idx)[0], atol=1e-3)


def test_mlp_activations():
    x = torch.randn(3, 5, 64)
    relu2 = model_with(mlp="relu2").blocks[0].mlp
    torch.testing.assert_close(relu2(x), relu2.proj(F.relu(relu2.fc(x)) ** 2))
    swiglu = model_with(mlp="swiglu").blocks[0].mlp
    assert swiglu.fc.weight.shape == (2 * 192, 64) and swiglu.proj.weight.shape == (64, 192)  # 8/3*64 -> 192
    gate, value = swiglu.fc(x).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(x), swiglu.proj(F.silu(gate) * value))


@pytest.mark.parametrize("option", [dict(qk_norm=True), dict(mlp="relu2"), dict(logit_softcap=15.0)])
def test_export_refuses_options_transformers_cannot_express(option):
    with pytest.raises(ValueError, match="cannot express"):
        gpt_hf_config(GPTConfig(**SHAPE, **option), 0, 0, "float32")


def test_export_accepts_z_loss_and_an_untied_head():
    hf = gpt_hf_config(GPTConfig(**SHAPE, z_loss=1e-4, tie_embeddings=False), 0, 0, "float32")
    assert hf.tie_word_embeddings is False


def test_invalid_options_name_the_key():
    with pytest.raises(ValueError, match="model.mlp"):
        GPTConfig(**SHAPE, mlp="relu")
    with pytest.raises(ValueError, match="model.logit_softcap"):
        GPTConfig(**SHAPE, logit_softcap=-1.0)
