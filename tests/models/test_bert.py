"""The BERT encoder: masking-aware loss, padding invariance, exact split of the loss, save/load."""

from __future__ import annotations

import torch

from pilelm.models import build_model, model_spec
from pilelm.models.bert import Bert, BertConfig
from pilelm.training.checkpoint import load_model, save_model


def tiny(nsp: bool = False) -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64, dropout=0.0, nsp=nsp))


def batch(n: int = 3, t: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (n, t), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(n, t, generator=g) < 0.3
    labels[chosen] = ids[chosen]
    inputs = torch.where(chosen, torch.full_like(ids, 4), ids)
    return inputs, labels


def test_loss_is_the_mean_over_masked_positions():
    model = tiny().eval()
    inputs, labels = batch()
    logits, loss = model(inputs)
    assert logits.shape == (3, 20, 97) and loss is None
    _, loss = model(inputs, labels)
    sel = labels != -100
    want = torch.nn.functional.cross_entropy(logits[sel], labels[sel])
    torch.testing.assert_close(loss, want)


def test_micro_batches_with_the_global_count_add_up_to_the_full_batch_loss():
    model = tiny().eval()
    inputs, labels = batch(4)
    _, full = model(inputs, labels)
    n = float((labels != -100).sum())
    parts = [model(inputs[i : i + 2], labels[i : i + 2], num_targets=n)[1] for i in (0, 2)]
    torch.testing.assert_close(parts[0] + parts[1], full)


def test_padding_does_not_change_real_positions():
    model = tiny().eval()
    inputs, _ = batch(1, 12)
    ref = model.encode(inputs)
    padded = torch.cat([inputs, torch.zeros(1, 8, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 8)], 1).long()
    out = model.encode(padded, attention_mask=mask)
    torch.testing.assert_close(out[:, :12], ref, atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional():
    model = tiny().eval()
    inputs, _ = batch(1, 10)
    changed = inputs.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 97
    # A change at the last position reaches the first one (a causal model would not see it).
    assert not torch.allclose(model.encode(inputs)[0, 0], model.encode(changed)[0, 0])


def test_nsp_head_adds_its_loss():
    model = tiny(nsp=True).eval()
    inputs, labels = batch()
    types = torch.zeros_like(inputs)
    types[:, 10:] = 1
    nsp_label = torch.tensor([0, 1, 0])
    _, mlm_only = model(inputs, labels, token_type_ids=types)
    _, both = model(inputs, labels, token_type_ids=types, next_sentence_label=nsp_label)
    nsp = torch.nn.functional.cross_entropy(model.nsp_logits(inputs, types), nsp_label)
    torch.testing.assert_close(both, mlm_only + nsp)


def test_training_mode_skips_full_logits_and_learns():
    model = tiny(nsp=True)
    model.train()
    inputs, labels = batch(8, 24, seed=1)
    nsp_label = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        logits, loss = model(inputs, labels, next_sentence_label=nsp_label)
        assert logits.numel() == 0
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_registered_family_saves_and_loads(tmp_path):
    model = tiny(nsp=True).eval()
    assert model_spec(model.cfg)["family"] == "bert"
    assert isinstance(build_model(model.cfg), Bert)
    save_model(tmp_path, model, model.cfg)
    loaded, cfg = load_model(tmp_path)
    assert cfg == model.cfg
    inputs, _ = batch()
    torch.testing.assert_close(loaded.eval()(inputs)[0], model(inputs)[0])
    assert model.flops_per_token() > 6 * model.num_params()
