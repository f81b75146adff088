"""Optimisers against their published update rules; schedules as pure functions of the step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pilelm.models.gpt import GPT, GPTConfig
from pilelm.training.optim import (
    LAMB,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    lr_multiplier,
    newton_schulz,
    param_groups,
    set_lr,
)


def lamb_reference(x, grads, lr, b1, b2, eps, wd):
    """LAMB by hand, element by element in Python floats (You et al. 2019, Algorithm 2)."""
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        r = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) for mi, vi in zip(m, v, strict=True)]
        u = [ri + wd * xi for ri, xi in zip(r, x, strict=True)]
        x_norm = math.sqrt(sum(xi * xi for xi in x))
        u_norm = math.sqrt(sum(ui * ui for ui in u))
        trust = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
        x = [xi - lr * trust * ui for xi, ui in zip(x, u, strict=True)]
    return x


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_the_published_rule(wd):
    x0 = [1.0, -2.0, 0.5]
    grads = [[0.5, 0.1, -0.3], [-0.2, 0.4, 0.05], [0.3, -0.1, 0.2]]
    p = nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = LAMB([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = lamb_reference(x0, grads, 0.1, 0.9, 0.999, 1e-6, wd)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_lamb_first_step_by_hand():
    # Step 1 with bias correction: r = g / (|g| + eps) = sign(g) (eps -> 0); u = r + wd x.
    # x = (3, 4): ||x|| = 5; g = (1, -1), wd = 0: u = (1, -1), ||u|| = sqrt 2;
    # x' = x - lr * 5 / sqrt(2) * u.
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LAMB([p], lr=0.01, betas=(0.9, 0.999), eps=0.0)
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    step = 0.01 * 5 / math.sqrt(2)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - step, 4.0 + step], dtype=torch.float64))


def test_lamb_trust_ratio_is_one_for_a_zero_parameter():
    # ||x|| = 0 (e.g. a zero-initialised bias): the update is plain lr * r, not zero.
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = LAMB([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([2.0, -0.5], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))


def test_cosine_schedule_shape():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    mults = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(mults[:10], mults[1:10], strict=False))  # warmup rises
    after = mults[10:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # then never rises
    assert after[0] == pytest.approx(1.0)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)  # reaches the floor
    assert lr_multiplier(1000, 100, cfg) == pytest.approx(0.1)  # and stays there
    assert min(mults) >= 0.1 - 1e-12
    # halfway through the decay the cosine is at the mean of peak and floor
    assert lr_multiplier(55, 100, cfg) == pytest.approx(0.55)


def test_wsd_schedule_is_flat_then_linear_to_the_floor():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_frac=0.2)
    mults = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert all(m == 1.0 for m in mults[5:80])
    decay = mults[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] == pytest.approx(0.0)
    diffs = {round(a - b, 9) for a, b in zip(decay, decay[1:], strict=False)}
    assert len(diffs) == 1  # linear


def test_constant_schedule_and_no_warmup():
    cfg = ScheduleConfig(kind="constant", warmup_steps=0)
    assert {lr_multiplier(s, 50, cfg) for s in range(60)} == {1.0}


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32))


def test_param_groups_decay_matrices_only_and_count_tied_weights_once():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.wte.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize(("name", "lr"), [("adamw", 3e-3), ("lamb", 0.1), ("muon", 3e-3)])
def test_every_optimizer_fits_a_fixed_batch(name, lr):
    # LAMB's step is lr * ||x|| per layer, so it takes a larger lr (the paper's are 1e-3 .. 1e-2
    # at BERT scale; weights here are smaller).
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=lr, muon_lr=0.02, weight_decay=0.0))
    assert all("base_lr" in g for g in opt.param_groups)
    set_lr(opt, 1.0)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_set_lr_scales_each_groups_own_base():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    set_lr(opt, 0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == [5e-4, 0.01]


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g, 5).float())
    # The quintic iteration drives singular values into roughly [0.7, 1.2] (Jordan et al.).
    assert s.min() > 0.5 and s.max() < 1.5
    s_tall = torch.linalg.svdvals(newton_schulz(g.T.contiguous(), 5).float())
    assert s_tall.min() > 0.5 and s_tall.max() < 1.5


def test_optimizer_state_round_trips_through_weights_only_load(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="lamb"))
    idx = torch.randint(0, 64, (2, 9))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    state = torch.load(tmp_path / "o.pt", weights_only=True)
    opt2 = build_optimizer(tiny_model(), OptimConfig(name="lamb"))
    opt2.load_state_dict(state)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
