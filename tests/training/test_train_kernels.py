"""The training fast paths compute what the plain ones do: chunked linear cross-entropy,
explicit CPU attention, the GELU identity, bf16 weights with fp32 master weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pilelm.models.gpt as gpt
from pilelm.models.fused_ce import linear_cross_entropy, reference_cross_entropy
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training.optim import OptimConfig, build_optimizer
from pilelm.training.precision import MasterWeights, Precision


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_matches_the_unfused_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(33, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (50,), generator=g)
    t[3] = -100
    t[10:15] = -100
    loss = linear_cross_entropy(x, w, t, chunk=chunk)
    (2 * loss).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-100)
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    assert gx[3].abs().max() == 0 and gx[10:15].abs().max() == 0  # ignored rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk=chunk), ref)


def test_chunked_cross_entropy_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(128, 32, generator=g) * 0.1
    t = torch.randint(0, 128, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, w, t, chunk=16)
        ref = reference_cross_entropy(x, w, t)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - ref.item()) < 1e-2


def model(arch: str = "gpt2", dtype=torch.float32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, vocab_size=96, block_size=32, n_layer=2, n_head=2, d_model=64)).to(dtype)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_gpt_fused_loss_equals_logits_loss(arch):
    idx = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(2))
    a, b = model(arch), model(arch)
    logits, loss_a = a(idx[:, :-1], idx[:, 1:])
    none, loss_b = b(idx[:, :-1], idx[:, 1:], return_logits=False)
    assert logits.shape == (3, 16, 96) and none is None
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_explicit_cpu_attention_matches_sdpa(monkeypatch):
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    results = []
    for limit in (512, 0):  # explicit path, then SDPA
        monkeypatch.setattr(gpt, "CPU_EXPLICIT_ATTENTION_MAX_T", limit)
        m = model()
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_explicit_attention_is_causal():
    q, k, v = (torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    y = gpt.causal_attention_explicit(q, k, v, 0.0)
    v2 = v.clone()
    v2[:, :, 4:] += 1.0  # change the future of positions 0..3
    y2 = gpt.causal_attention_explicit(q, k, v2, 0.0)
    torch.testing.assert_close(y[:, :, :4], y2[:, :, :4])
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_gelu_sigmoid_form_is_the_tanh_approximation():
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    torch.testing.assert_close(gpt.gelu_tanh_sigmoid_form(x.float()).double(), F.gelu(x, approximate="tanh"),
                               atol=2e-6, rtol=1e-5)


def test_master_weights_keep_fp32_copies_and_save_them():
    m = model(dtype=torch.bfloat16)
    opt = MasterWeights(build_optimizer(m, OptimConfig(lr=1e-2)), m)
    masters = list(opt.masters.values())
    assert all(p.dtype == torch.float32 for p in masters)
    idx = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        _, loss = m(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        assert all(p.grad is None for p in m.parameters())  # moved into the masters' fp32 grads
        opt.step()
        opt.zero_grad()
    for p, master in opt.masters.items():
        assert torch.equal(p.data, master.data.to(torch.bfloat16))
    # Updates smaller than a bf16 ulp accumulate in the masters instead of vanishing.
    assert any(not torch.equal(master.data, master.data.bfloat16().float()) for master in masters)
    state = Precision("bf16", torch.device("cpu")).model_state(m)
    assert state["wte.weight"].dtype == torch.float32
    assert torch.equal(state["wte.weight"], opt.masters[m.wte.weight].data)
