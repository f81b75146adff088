"""Training budgets (loop.max_tokens, loop.max_minutes) with the schedule over the budget, exact
resumes, MFU's denominator, the EMA of the weights and document-aligned windows. Time is a fake
clock injected into the trainer: nothing here asserts on real time."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from test_train import losses, make_shards, tiny_config

from pilelm.training import checkpoint
from pilelm.training.budget import TrainingBudget
from pilelm.training.ema import WeightEMA
from pilelm.training.loader import BatchLoader, document_window_starts
from pilelm.training.mfu import PeakFlops, resolve_peak
from pilelm.training.optim import ScheduleConfig
from pilelm.training.trainer import Trainer, run_train

TOKENS_PER_STEP = 4 * 32  # tiny_config: micro_batch 4 x block_size 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the schedule over a budget -------------------------------------------------------------


def test_a_token_budget_is_a_step_count_and_the_schedule_spans_it():
    b = TrainingBudget(max_steps=1000, max_tokens=10 * 128 + 1, max_minutes=0, tokens_per_step=128)
    assert b.total_steps == 11  # ceil: the budget is spent, not undershot
    cfg = ScheduleConfig(kind="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_frac=0.5)
    mults = [b.lr_multiplier(s, 0.0, cfg) for s in range(11)]
    assert mults[2:5] == [1.0, 1.0, 1.0] and mults[-1] == pytest.approx(0.0)
    assert TrainingBudget(5, 10_000, 0, 128).total_steps == 5  # max_steps still caps


def test_a_time_budget_shapes_the_schedule_by_the_fraction_used():
    b = TrainingBudget(max_steps=10**6, max_tokens=0, max_minutes=10, tokens_per_step=128)
    cfg = ScheduleConfig(kind="wsd", warmup_steps=3, min_lr_ratio=0.1, decay_frac=0.2)
    assert b.lr_multiplier(0, 0.0, cfg) == pytest.approx(1 / 3)  # warmup counts steps
    assert b.lr_multiplier(50, 0.5 * 600, cfg) == 1.0  # stable
    assert b.lr_multiplier(90, 0.9 * 600, cfg) == pytest.approx(0.55)  # half-way down the decay
    assert b.lr_multiplier(99, 600.0, cfg) == pytest.approx(0.1)
    assert not b.done(99, 599.0) and b.done(99, 600.0)


def test_training_to_a_token_budget_stops_there_and_ends_at_the_floor(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 1000, "loop.max_tokens": 6 * TOKENS_PER_STEP - 5,
                                                   "schedule.kind": "wsd", "schedule.min_lr_ratio": 0.0,
                                                   "schedule.decay_frac": 0.5, "loop.eval_every": 0})
    run = run_train(cfg)
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4, 5, 6]
    assert r[-1]["lr"] < r[3]["lr"] and json.loads((run / "manifest.json").read_text())["counts"]["steps"] == 6


def test_resume_after_a_stop_keeps_the_token_budget_exact(shards, tmp_path):
    over = {"loop.max_steps": 1000, "loop.max_tokens": 7 * TOKENS_PER_STEP, "schedule.kind": "wsd",
            "loop.save_every": 100}
    a = run_train(tiny_config(shards, tmp_path / "a", **over))
    b_cfg = tiny_config(shards, tmp_path / "b", **over, **{"loop.stop_at_step": 3})
    run_train(b_cfg)
    assert not (tmp_path / "b" / "manifest.json").exists() and [s for s, _ in losses(tmp_path / "b")] == [1, 2, 3]
    b = run_train(tiny_config(shards, tmp_path / "b", **over))
    assert losses(a) == losses(b) and len(losses(b)) == 7
    assert [x["lr"] for x in rows(a)] == [x["lr"] for x in rows(b)]


class FakeClock:
    """Advances ``per_step`` seconds inside every training step and never otherwise."""

    def __init__(self, trainer: Trainer, per_step: float, start: float = 0.0):
        self.now = start
        step = trainer.train_step

        def timed_step():
            result = step()
            self.now += per_step
            return result

        trainer.train_step = timed_step
        trainer.clock = lambda: self.now


def test_a_time_budget_stops_the_run_and_counts_time_before_a_stop(shards, tmp_path, caplog):
    over = {"loop.max_steps": 1000, "loop.max_minutes": 1.0, "schedule.kind": "wsd", "schedule.min_lr_ratio": 0.0,
            "schedule.decay_frac": 0.5, "schedule.warmup_steps": 1, "loop.eval_every": 0, "loop.save_every": 100}
    t = Trainer(tiny_config(shards, tmp_path / "whole", **over))
    FakeClock(t, per_step=10.0)
    t.fit()
    whole = rows(tmp_path / "whole")
    assert [x["step"] for x in whole] == [1, 2, 3, 4, 5, 6]  # 6 x 10 s = the minute
    assert [x["elapsed_s"] for x in whole] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert [x["lr"] for x in whole][:4] == [3e-3] * 4  # stable until half the minute...
    assert whole[4]["lr"] == pytest.approx(3e-3 * 2 / 3)  # ...then linear to 0 at 60 s
    # Stopped after 2 steps (20 s) and resumed by a fresh process: 4 more steps, the same schedule.
    t = Trainer(tiny_config(shards, tmp_path / "split", **over, **{"loop.stop_at_step": 2}))
    FakeClock(t, per_step=10.0, start=1000.0)
    t.fit()
    state = checkpoint.load_torch(checkpoint.checkpoint_dir(tmp_path / "split", 2) / checkpoint.TRAIN_STATE)
    assert state["elapsed_s"] == 20.0
    t = Trainer(tiny_config(shards, tmp_path / "split", **over))
    FakeClock(t, per_step=10.0, start=5000.0)
    with caplog.at_level(logging.INFO):
        t.fit()
    assert "20 s of training" in caplog.text
    split = rows(tmp_path / "split")
    assert [(x["step"], x["loss"], x["lr"]) for x in split] == [(x["step"], x["loss"], x["lr"]) for x in whole]
    # Rerunning a finished budget does nothing.
    t = Trainer(tiny_config(shards, tmp_path / "split", **over))
    FakeClock(t, per_step=10.0)
    t.fit()
    assert len(rows(tmp_path / "split")) == 6


# --- MFU ----------------------------------------------------------------------------------


def test_mfu_is_never_above_one_and_says_which_peak(caplog):
    peak = PeakFlops(1e9, "measured")
    assert peak.utilisation(5e8) == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING):
        assert peak.utilisation(3e9) == 1.0
    assert "above the MFU peak" in caplog.text and peak.source == "achieved" and peak.value == 3e9
    assert peak.utilisation(1.5e9) == pytest.approx(0.5)
    assert "TFLOP/s (achieved)" in peak.describe()


def test_the_measured_peak_keeps_the_best_of_all_starts(tmp_path, monkeypatch):
    import pilelm.training.mfu as mfu

    rates = iter([1e9, 4e9, 2e9, 1e9, 1e9, 1e9])
    monkeypatch.setattr(mfu, "matmul_flops", lambda device, dtype, seconds: next(rates))
    cache = tmp_path / "hardware.json"
    cpu = torch.device("cpu")
    assert resolve_peak(cpu, 0.0, cache).value == 4e9  # best of three
    assert resolve_peak(cpu, 0.0, cache).value == 4e9  # a slower (busier) start does not lower it
    assert resolve_peak(cpu, 0.0, cache, measure=False).value == 4e9
    assert resolve_peak(cpu, 7e12, cache).source == "configured"


@pytest.mark.parametrize("native", [True, False])
def test_the_peak_is_measured_in_the_fastest_native_dtype(tmp_path, monkeypatch, native):
    """Without native bf16 (emulated bf16 matmuls run ~40x below fp32) the peak is fp32's, the
    precision such a CPU trains in; a cached peak of the other dtype is not reused."""
    import pilelm.training.mfu as mfu

    seen = []
    monkeypatch.setattr(mfu, "bf16_native", lambda device: native)
    monkeypatch.setattr(mfu, "matmul_flops", lambda device, dtype, seconds: seen.append(dtype) or 2e9)
    cache = tmp_path / "hardware.json"
    cache.write_text(json.dumps({f"cpu:{torch.get_num_threads()}:{'float32' if native else 'bfloat16'}": 9e9}))
    peak = resolve_peak(torch.device("cpu"), 0.0, cache)
    name = "bfloat16" if native else "float32"
    assert seen == [torch.bfloat16 if native else torch.float32] * 3
    assert peak.value == 2e9 and f"{name} matmul" in peak.source


def test_a_run_logs_mfu_within_one(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.peak_flops": 1.0}))  # absurdly low peak
    assert all(0 < r["mfu"] <= 1.0 for r in rows(run) if "mfu" in r)
    assert json.loads((run / "manifest.json").read_text())["extra"]["peak_flops_source"] == "achieved"


# --- EMA --------------------------------------------------------------------------------


def test_ema_follows_the_warmed_up_average():
    w = torch.zeros(3)
    ema = WeightEMA({"w": w}, decay=0.9)
    w.fill_(1.0)
    ema.update({"w": w})  # update 1: decay min(0.9, 2/11)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1 - 2 / 11))
    with ema.applied({"w": w}):
        torch.testing.assert_close(w, torch.full((3,), 1 - 2 / 11))
    assert w.tolist() == [1.0, 1.0, 1.0]


def test_ema_checkpoints_hold_the_average_and_resume_exactly(shards, tmp_path):
    over = {"loop.ema": 0.9, "loop.save_every": 4}
    a = run_train(tiny_config(shards, tmp_path / "a", **over))
    run_train(tiny_config(shards, tmp_path / "b", **over, **{"loop.stop_at_step": 4}))
    b = run_train(tiny_config(shards, tmp_path / "b", **over))
    assert losses(a) == losses(b)
    assert [r.get("val_loss") for r in rows(a)] == [r.get("val_loss") for r in rows(b)]
    step_dir = checkpoint.list_checkpoints(a)[-1][1]
    state = checkpoint.load_torch(step_dir / checkpoint.TRAIN_STATE)
    model, _, _ = checkpoint.load_for_inference(a)
    saved = model.state_dict()["wte.weight"]
    assert not torch.equal(saved, state["raw_model"]["wte.weight"])  # the model is the average
    plain = run_train(tiny_config(shards, tmp_path / "plain"))
    assert losses(plain) == losses(a)  # the average does not touch training
    with pytest.raises(ValueError, match="loop.ema"):
        run_train(tiny_config(shards, tmp_path / "a", **{"loop.max_steps": 12}))


# --- document-aligned windows ------------------------------------------------------------


def test_document_windows_start_at_document_boundaries_and_cover_long_documents():
    sizes = np.array([5, 12, 3, 30])
    starts = document_window_starts(sizes, seq_len=8)
    assert starts.tolist() == [0, 5, 13, 17, 20, 28, 36, 44]


def test_document_aligned_loader_reads_windows_from_document_starts():
    sizes = np.array([5, 12, 3, 30, 40])
    tokens = np.arange(sizes.sum(), dtype=np.uint16)
    starts = document_window_starts(sizes, 8)
    loader = BatchLoader(tokens, 8, 2, 1, seed=0, window_starts=starts)
    assert loader.sampler.num_windows == len(starts[starts + 9 <= len(tokens)])
    seen = set()
    for _ in range(loader.sampler.num_windows // 2):
        batch = loader.next_step()[0]
        seen |= set(batch["input_ids"][:, 0].tolist())
        torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert seen <= set(starts.tolist()) and {0, 5, 17, 20} <= seen


def test_document_aligned_training_runs(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.window_start": "document"}))
    assert rows(run)[-1]["loss"] < rows(run)[0]["loss"]


# --- sequence-length warmup -----------------------------------------------------------------


def test_sequence_length_warmup_cuts_windows_then_trains_on_full_ones(shards, tmp_path):
    """loop.seq_len_warmup=0.6 over 10 steps: steps 1-2 see windows of 32/4 tokens, 3-4 of 32/2,
    the rest full windows, always the same tokens per step (the loss's mean over them)."""
    cfg = tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 10, "loop.seq_len_warmup": 0.6,
                                                   "loop.eval_every": 0})
    trainer = Trainer(cfg)
    seen = []
    trainer.raw_model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    trainer.fit()
    assert seen == [(16, 8)] * 2 + [(8, 16)] * 2 + [(4, 32)] * 6
    with pytest.raises(ValueError, match="seq_len_warmup"):
        tiny_config(shards, tmp_path / "bad", **{"loop.seq_len_warmup": 1.5})
    with pytest.raises(ValueError, match="seq_len_warmup does not combine with privacy"):
        tiny_config(shards, tmp_path / "bad", **{"loop.seq_len_warmup": 0.3, "privacy.enabled": True,
                                                 "privacy.noise_multiplier": 1.0})


def test_sequence_length_warmup_keeps_the_loss_of_the_tokens(shards, tmp_path):
    """A cut window's loss is the mean over the same targets: with warmup the first step's loss is
    that of the model on the uncut batch's tokens cut into 4 (checked against a direct forward)."""
    cfg = tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 1, "loop.seq_len_warmup": 1.0,
                                                   "loop.eval_every": 0})
    trainer = Trainer(cfg)
    batch = trainer.loader.next_step()[0]
    trainer.loader = type("Replay", (), {"next_step": lambda self: [batch],
                                         "tokens_per_step": trainer.loader.tokens_per_step})()
    with torch.no_grad(), trainer.precision.autocast():
        _, direct = trainer.raw_model(batch["input_ids"].reshape(16, 8), batch["labels"].reshape(16, 8))
    assert trainer.window_cut() == 4
    assert trainer.train_step().loss == pytest.approx(float(direct), rel=1e-3)
