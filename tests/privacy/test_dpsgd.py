"""DP-SGD: the per-sample clipping bound with known gradients, the noise scale, epsilon against
Opacus' published values, Poisson sampling, private training of GPT and BERT, exact resume,
and the settings it refuses. Tiny models (2 layers, d=64, vocab 128)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from pilelm.core.manifest import read_manifest
from pilelm.privacy.accountant import Accountant, noise_for_epsilon
from pilelm.privacy.per_sample import ClippedGradients, clip_factors
from pilelm.training import checkpoint
from pilelm.training.trainer import Trainer, run_train
from tests.training.test_train import losses, make_shards, tiny_config

PRIVATE = {"privacy.enabled": True, "privacy.noise_multiplier": 1.0, "loop.eval_every": 0}
REPRODUCIBLE = {**PRIVATE, "privacy.secure_rng": False}  # sampling and noise from loop.seed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("dp_shards"))


def _linear_loss(model, batch):
    # loss_i = w . x_i, so the gradient of sample i is exactly x_i.
    return model(batch["input_ids"].float()).sum()


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_clipping_bounds_each_sample_with_known_gradients(method):
    model = nn.Linear(3, 1, bias=False)
    x = torch.tensor([[0.3, 0.4, 0.0], [0.0, 1.2, 1.6], [6.0, 0.0, 8.0], [0.0, 0.0, 0.0]])  # norms 0.5, 2, 10, 0
    clipped = ClippedGradients(model, _linear_loss, max_norm=1.0, method=method)
    clipped.add({"input_ids": x[:2]})
    clipped.add({"input_ids": x[2:]})  # chunks of one step accumulate
    assert clipped.method == method and clipped.count == 4
    torch.testing.assert_close(torch.cat(clipped.norms), torch.tensor([0.5, 2.0, 10.0, 0.0]))
    expected = x[0] + x[1] / 2 + x[2] / 10  # each sample's gradient scaled to norm <= 1
    torch.testing.assert_close(clipped.summed["weight"][0], expected, rtol=1e-5, atol=1e-6)
    factors = clip_factors(torch.tensor([0.5, 2.0, 10.0]), 1.0)
    assert torch.all(factors * torch.tensor([0.5, 2.0, 10.0]) <= 1.0 + 1e-6)


def test_vmap_and_loop_agree_on_a_transformer():
    from pilelm.models import get_spec
    from pilelm.models.gpt import GPT, GPTConfig
    from pilelm.privacy.per_sample import spec_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, d_model=32))
    batch = {"input_ids": torch.randint(0, 128, (3, 16)), "labels": torch.randint(0, 128, (3, 16))}
    out = {}
    for method in ("vmap", "loop"):
        c = ClippedGradients(model, spec_loss(get_spec("gpt")), max_norm=0.5, method=method)
        c.add(batch)
        out[method] = c
    for name, g in out["vmap"].summed.items():
        torch.testing.assert_close(g, out["loop"].summed[name], rtol=1e-4, atol=1e-6)
    # The tied output projection is one parameter, not two.
    assert "lm_head.weight" not in out["vmap"].summed and "wte.weight" in out["vmap"].summed


def test_epsilon_equals_opacus_published_values():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, 90 epochs (2250 steps), delta 1e-5.
    acc = Accountant("rdp", delta=1e-5)
    for _ in range(2250):
        acc.step(1.5, 0.04)
    assert acc.epsilon() == pytest.approx(7.32911117143, abs=1e-6)
    assert acc.steps == 2250
    # The noise for epsilon 8 in the same setting: Opacus' published 1.4253 up to the binary
    # search's tolerance (0.01 in epsilon), and it spends at most the target.
    sigma = noise_for_epsilon(8.0, 1e-5, 0.04, 2250)
    assert sigma == pytest.approx(1.425307617, abs=0.01)
    spent = Accountant("rdp", delta=1e-5)
    spent.load_state_dict({"mechanism": "rdp", "history": [[sigma, 0.04, 2250]]})
    assert 7.9 < spent.epsilon() <= 8.0
    # The state round-trips through JSON exactly.
    again = Accountant("rdp", delta=1e-5)
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.epsilon() == acc.epsilon()


def test_noise_scale_matches_the_accountants_multiplier(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", **{**PRIVATE, "privacy.noise_multiplier": 0.0,
                                                   "privacy.target_epsilon": 4.0, "privacy.max_grad_norm": 0.5})
    trainer = Trainer(cfg)
    dp = trainer.private
    sigma = dp.noise_multiplier
    assert dp.noise_std == pytest.approx(sigma * 0.5)
    # The multiplier solved for the target spends (just under) the target in max_steps steps.
    acc = Accountant("rdp", dp.delta)
    for _ in range(cfg.loop.max_steps):
        acc.step(sigma, dp.sample_rate)
    assert 3.9 < acc.epsilon() <= 4.0 + 1e-6
    assert dp.delta == pytest.approx(1 / dp.num_samples)
    dp.gradients()
    noise = torch.cat([(p.grad * dp.expected_batch - dp.clipped.summed[n]).flatten()
                       for n, p in dp.clipped.params.items()])
    assert noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(sigma * 0.5, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * sigma * 0.5


def test_poisson_sampling_is_seeded_and_has_the_expected_rate(shards, tmp_path):
    dp = Trainer(tiny_config(shards, tmp_path / "run", **REPRODUCIBLE)).private
    sizes = [len(dp.poisson_windows(s)) for s in range(2000)]
    assert np.mean(sizes) == pytest.approx(dp.expected_batch, rel=0.05)
    assert np.var(sizes) == pytest.approx(dp.num_samples * dp.sample_rate * (1 - dp.sample_rate), rel=0.15)
    assert np.array_equal(dp.poisson_windows(7), dp.poisson_windows(7))
    w = dp.poisson_windows(7)
    assert len(set(w.tolist())) == len(w) and (w < dp.num_samples).all()


def test_sampling_and_noise_are_secret_unless_asked_to_be_reproducible(shards, tmp_path):
    """By default the windows of a step and its noise come from the OS's entropy, not from the
    public loop.seed: two runs with the same seed (and one run asked twice) draw differently."""
    cfg = tiny_config(shards, tmp_path / "run", **PRIVATE)
    a, b = Trainer(cfg).private, Trainer(cfg).private
    assert a.expected_batch >= 4
    assert not np.array_equal(a.poisson_windows(3), b.poisson_windows(3))
    assert not np.array_equal(a.poisson_windows(3), a.poisson_windows(3))
    noise = [torch.randn(64, generator=dp._noise_generator(torch.device("cpu"), 3)) for dp in (a, a, b)]
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert a.randomness() == {"sampling": "os-entropy (secrets)", "noise": "os-entropy (secrets)"}
    # Asked to be reproducible: the same draws from the same seed, and the record says so.
    r = tiny_config(shards, tmp_path / "run", **REPRODUCIBLE)
    a, b = Trainer(r).private, Trainer(r).private
    assert np.array_equal(a.poisson_windows(3), b.poisson_windows(3))
    assert torch.equal(*(torch.randn(64, generator=dp._noise_generator(torch.device("cpu"), 3)) for dp in (a, b)))
    assert set(a.randomness().values()) == {"loop.seed (reproducible, not secret)"}


def test_private_training_logs_and_stores_epsilon(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{**PRIVATE, "privacy.noise_multiplier": 0.0,
                                                            "privacy.target_epsilon": 8.0,
                                                            "loop.tensorboard": True}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rows]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False)) and eps[-1] <= 8.0 + 1e-3
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    record = read_manifest(run)["extra"]["privacy"]
    assert record["epsilon"] == pytest.approx(eps[-1], abs=1e-3) and record["steps"] == 8
    assert record["per_sample"] == "vmap" and record["sampling"] == "poisson"
    assert record["randomness"] == {"sampling": "os-entropy (secrets)", "noise": "os-entropy (secrets)"}
    assert (checkpoint.latest_checkpoint(run) / "privacy.json").is_file()
    assert list((run / "tensorboard").iterdir())
    from pilelm.core.report import StageResult, write_report

    report = write_report(tmp_path, [StageResult("train", run, "ran", 1.0)]).read_text()
    assert f"| DP-SGD epsilon (delta) | {record['epsilon']:.2f} ({record['delta']:.2g}) |" in report


def test_resume_keeps_the_accountant_exact(shards, tmp_path):
    kw = {**REPRODUCIBLE, "loop.max_steps": 10, "loop.save_every": 5, "model.dropout": 0.1}
    straight = run_train(tiny_config(shards, tmp_path / "straight", **kw))
    resumed = tmp_path / "resumed"
    run_train(tiny_config(shards, resumed, **kw, **{"loop.stop_at_step": 5}))
    stopped = json.loads((checkpoint.latest_checkpoint(resumed) / "privacy.json").read_text())
    assert stopped["step"] == 5 and [h[2] for h in stopped["accountant"]["history"]] == [5]
    run_train(tiny_config(shards, resumed, **kw))
    assert losses(resumed) == losses(straight)
    rows = [[json.loads(line)["dp_epsilon"] for line in (r / "metrics.jsonl").read_text().splitlines()]
            for r in (straight, resumed)]
    assert rows[0] == rows[1]
    a, b = (json.loads((checkpoint.latest_checkpoint(r) / "privacy.json").read_text()) for r in (straight, resumed))
    assert a == b and a["accountant"]["history"][0][2] == 10
    wa = checkpoint.load_model(checkpoint.latest_checkpoint(straight))[0].state_dict()
    wb = checkpoint.load_model(checkpoint.latest_checkpoint(resumed))[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bert_trains_privately_one_sample_at_a_time(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "bert", **{
        **PRIVATE, "family": "bert", "loop.max_steps": 3,
        "bert.n_layer": 2, "bert.n_head": 2, "bert.d_model": 64, "bert.block_size": 32, "bert.nsp": False}))
    record = read_manifest(run)["extra"]["privacy"]
    assert record["per_sample"] == "loop" and record["steps"] == 3 and record["epsilon"] > 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"family": "bert", "bert.n_layer": 2, "bert.n_head": 2, "bert.d_model": 64, "bert.block_size": 32,
      "bert.nsp": True}, "bert.nsp=false"),
    ({"loop.on_nonfinite": "skip"}, "loop.on_nonfinite=stop"),
    pytest.param({"loop.precision": "bf16"}, "bf16-autocast", marks=pytest.mark.native_bf16),
    ({"loop.micro_batch": 400}, "expected batch"),
])
def test_settings_it_cannot_account_for_are_refused(shards, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(shards, tmp_path / "run", **{**PRIVATE, **overrides}))


def test_privacy_config_needs_one_noise_setting(shards, tmp_path):
    with pytest.raises(ValueError, match="exactly one of privacy.target_epsilon"):
        tiny_config(shards, tmp_path / "run", **{"privacy.enabled": True})
    with pytest.raises(ValueError, match="exactly one of privacy.target_epsilon"):
        tiny_config(shards, tmp_path / "run", **{**PRIVATE, "privacy.target_epsilon": 3.0})


@pytest.mark.parametrize("key", ["privacy.target_epsilon", "privacy.noise_multiplier"])
def test_a_privacy_setting_without_privacy_enabled_is_refused(shards, tmp_path, key):
    with pytest.raises(ValueError, match=rf"{key} is set but privacy.enabled=false.*add privacy.enabled=true"):
        tiny_config(shards, tmp_path / "run", **{key: 8.0})
