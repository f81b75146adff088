import pytest
import torch

from pilelm.models.gpt import GPT, GPTConfig, KVCache


def tiny(arch: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_kv_cache_matches_full_forward(arch):
    model = tiny(arch)
    idx = torch.randint(0, 97, (3, 12))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3, 16, "cpu", torch.float32)
    first, _ = model(idx[:, :7], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]
    inc = torch.cat([first, *steps], dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_left_padding_gives_the_unpadded_logits(arch):
    model = tiny(arch)
    a = torch.randint(0, 97, (1, 9))
    b = torch.randint(0, 97, (1, 5))
    ref_b, _ = model(b)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    cache = KVCache(model.cfg, 2, 12, "cpu", torch.float32)
    cache.key_mask[1, :4] = False
    positions = torch.stack([torch.arange(9), torch.clamp(torch.arange(9) - 4, min=0)])
    out, _ = model(batch, cache=cache, positions=positions)
    torch.testing.assert_close(out[1, 4:], ref_b[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_loss_and_tied_weights():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.wte.weight
    assert tiny("neox").lm_head.weight is not tiny("neox").wte.weight
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
