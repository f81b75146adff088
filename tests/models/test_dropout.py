"""The CPU dropout: F.dropout's semantics (rate, scale, gradient, seeded, off in eval)."""

from __future__ import annotations

import pytest
import torch

from pilelm.models.dropout import Dropout, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_at_rate_p_and_keeps_the_mean(dtype):
    torch.manual_seed(0)
    x = torch.ones(64, 128, 33, dtype=dtype)  # an odd size: the random bits are cut to numel
    y = dropout(x, 0.1)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.9) < 0.005
    scale = torch.full_like(y, 1 / 0.9)  # p is rounded to 1/65536: the scale agrees to 1e-4
    assert torch.all((y == 0) | torch.isclose(y, scale, rtol=1e-4, atol=0))
    assert abs(y.double().mean().item() - 1.0) < 0.01


def test_gradient_is_the_same_mask():
    x = torch.randn(8, 50, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y.detach() != 0).float() / 0.7, rtol=1e-4, atol=0)


def test_seeded_off_in_eval_and_other_rates():
    x = torch.randn(1000)
    torch.manual_seed(1)
    a = dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.5))
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    m = Dropout(0.2)
    assert m(x).eq(0).any() and m.eval()(x) is x
    assert m.state_dict() == {}
