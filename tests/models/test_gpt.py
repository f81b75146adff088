import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_has_native_bf16

from pilelm.models.cpu_kernels import RepackedLinear
from pilelm.models.gpt import GPT, GPTConfig, KVCache


def tiny(arch: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64)).eval()


@pytest.mark.parametrize("inference", [False, True])  # True: the flat one-token path, repacked weights
@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_kv_cache_matches_full_forward(arch, inference):
    model = tiny(arch)
    idx = torch.randint(0, 97, (3, 12))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3, 16, "cpu", torch.float32)
    with torch.inference_mode(inference):
        first, _ = model(idx[:, :7], cache=cache)
        steps = [model(idx[:, t : t + 1], cache=cache, last_only=True)[0] for t in range(7, 12)]
    inc = torch.cat([first, *steps], dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_left_padded_decode_steps_give_the_unpadded_logits(arch):
    model = tiny(arch)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    ref_b, _ = model(torch.cat([b, a[:, :4]], 1))  # b then 4 decoded tokens
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    cache = KVCache(model.cfg, 2, 16, "cpu", torch.float32)
    cache.key_mask[1, :4] = False
    positions = torch.stack([torch.arange(9), torch.clamp(torch.arange(9) - 4, min=0)])
    with torch.inference_mode():
        model(batch, cache=cache, positions=positions, last_only=True)
        assert cache.padded
        steps = []
        for t in range(4):
            nxt = torch.stack([a[0, t], a[0, t]])[:, None]
            pos = torch.tensor([[9 + t], [5 + t]])
            steps.append(model(nxt, cache=cache, positions=pos, last_only=True)[0][1, 0])
    torch.testing.assert_close(torch.stack(steps), ref_b[0, 5:9], atol=1e-5, rtol=1e-5)


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


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("out_features,bias", [(96, True), (24, False)])
def test_inference_linear_equals_f_linear(threads, dtype, rows, out_features, bias):
    torch.manual_seed(0)
    lin = RepackedLinear(48, out_features, bias=bias).to(dtype)
    x = torch.randn(rows, 1, 48).to(dtype)
    ref = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    with torch.inference_mode():
        y = lin(x)
        assert y.shape == (rows, 1, out_features) and y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, **tol)
        # One fp32 row on one thread takes F.linear unless a transposed copy reads faster (out > in);
        # bf16 is repacked (by oneDNN) only where the CPU has native bf16, else it takes F.linear.
        repacked = not (dtype == torch.float32 and rows == 1 and threads == 1 and out_features <= 48)
        if dtype == torch.bfloat16:
            repacked = cpu_has_native_bf16()
        assert bool(lin._packed) == repacked
        with torch.no_grad():
            lin.weight.mul_(-2.0)  # an optimizer-like in-place update must not leave a stale copy
        torch.testing.assert_close(lin(x).double(), F.linear(x.double(), lin.weight.double(),
                                   None if lin.bias is None else lin.bias.double()), **tol)


def test_inference_linear_follows_dtype_changes_and_trains_normally():
    torch.manual_seed(0)
    lin = RepackedLinear(32, 64)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        y32 = lin(x)
    lin.to(torch.bfloat16)
    with torch.inference_mode():
        y16 = lin(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)
    lin.float()
    lin(x).sum().backward()  # with grad: plain F.linear
    assert lin.weight.grad is not None and lin.weight.grad.shape == (64, 32)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_bf16_decode_keeps_an_fp32_cache_on_cpu_and_tracks_the_full_forward(arch):
    model = tiny(arch).to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        full, _ = model(idx)
        cache = KVCache(model.cfg, 2, 16, "cpu", torch.bfloat16)
        assert cache.k.dtype == torch.float32
        first, _ = model(idx[:, :7], cache=cache)
        steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]
    inc = torch.cat([first, *steps], dim=1)
    assert inc.dtype == torch.bfloat16 and cache.padded is False
    torch.testing.assert_close(inc.float(), full.float(), atol=0.05, rtol=0.05)
    assert (inc.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_a_model_that_decoded_can_be_copied_and_pickled():
    import copy
    import io

    model = tiny("gpt2")
    with torch.inference_mode():
        model(torch.randint(0, 97, (2, 1)), cache=KVCache(model.cfg, 2, 4, "cpu", torch.float32), last_only=True)
    assert model.lm_head._packed
    clone = copy.deepcopy(model)
    assert not clone.lm_head._packed and torch.equal(clone.lm_head.weight, model.lm_head.weight)
    torch.save(model, io.BytesIO())


def test_no_grad_evaluation_keeps_f_linear():
    lin = RepackedLinear(32, 64)
    with torch.no_grad():
        lin(torch.randn(2, 32))
    assert not lin._packed  # only inference_mode (generation, serving) repacks
    with torch.inference_mode():
        lin(torch.randn(2, 32))
    assert lin._packed


def test_encode_gives_the_hidden_states_the_head_reads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)).eval()
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        h = model.encode(idx)
        logits, _ = model(idx)
        # causal: a prefix's states do not depend on what follows it (right padding is safe)
        h_prefix = model.encode(idx[:, :6])
    assert h.shape == (2, 10, 32)
    torch.testing.assert_close(model.lm_head(h), logits)
    torch.testing.assert_close(h_prefix, h[:, :6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(arch="neox", parallel_residual=False, rotary_pct=1.0),
    dict(arch="neox", bias=False, tie_embeddings=True),
    dict(arch="gpt2", bias=False, tie_embeddings=False, d_ff=96),
    dict(arch="gpt2", qk_norm=True, mlp="relu2", logit_softcap=15.0, tie_embeddings=False),
    dict(arch="neox", qk_norm=True, mlp="swiglu", rotary_pct=1.0, logit_softcap=10.0),
    # the cpu-10min recipe's form (Qwen3's): RMSNorm blocks, QK-norm with gains
    dict(arch="neox", norm="rmsnorm", qk_norm=True, qk_norm_gain=True, mlp="swiglu", rotary_pct=1.0, bias=False),
])
@pytest.mark.parametrize("threads", [1, 2])  # 1 thread: fp32 one-row steps take the W^T layout
def test_flat_decode_step_follows_the_module_forward_in_every_variant(variant, threads, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64, **variant)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calls = []
    flat = GPT._decode_one
    monkeypatch.setattr(GPT, "_decode_one", lambda self, *a: calls.append(1) or flat(self, *a))
    idx = torch.randint(0, 97, (1, 12))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            full, _ = model(idx)
        cache = KVCache(model.cfg, 1, 16, "cpu", torch.float32)
        with torch.inference_mode():
            model(idx[:, :7], cache=cache)
            steps = [model(idx[:, t : t + 1], cache=cache, last_only=True)[0] for t in range(7, 12)]
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 5  # every step took the flat path
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_packed_sequences_give_the_logits_and_loss_of_separate_ones(arch):
    """Segments: a block-diagonal causal mask and per-segment positions make each packed
    sequence compute exactly what it computes alone (no attention across sequences)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, vocab_size=97, n_layer=2, n_head=2, d_model=32, block_size=32)).eval()
    model.requires_grad_(False)
    seqs = [torch.randint(0, 97, (n,)) for n in (7, 5, 9)]
    pad = 3
    row = torch.cat([*seqs, torch.zeros(pad, dtype=torch.long)])[None]  # (1, 24)
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)] + [torch.full((pad,), -1)])[None]
    with torch.no_grad():  # inference: SDPA with the mask
        packed, _ = model(row, segments=segments)
    start = 0
    for s in seqs:
        alone, _ = model(s[None])
        torch.testing.assert_close(packed[0, start:start + len(s)], alone[0], atol=1e-5, rtol=1e-5)
        start += len(s)
    # Without segments the later sequences see the earlier ones: the check above is not vacuous.
    crossing, _ = model(row)
    assert not torch.allclose(crossing[0, 7:12], model(seqs[1][None])[0][0], atol=1e-3)
    # The loss over packed targets equals the token-weighted mean of the separate losses.
    targets = torch.full_like(row, -100)
    total, count, start = 0.0, 0, 0
    for s in seqs:
        targets[0, start:start + len(s) - 1] = s[1:]
        _, loss = model(s[None, :-1], s[None, 1:])
        total, count, start = total + float(loss) * (len(s) - 1), count + len(s) - 1, start + len(s)
    _, packed_loss = model(row, targets, segments=segments, return_logits=False)
    assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)
    # Training on CPU takes the written-out attention, which must honour the packing mask too.
    with torch.enable_grad():
        trained, _ = model.train()(row, segments=segments)
    torch.testing.assert_close(trained, packed, atol=1e-5, rtol=1e-5)
