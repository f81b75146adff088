"""Contrastive fine-tuning on the fine-tuning engine: it learns its pairs, resumes exactly,
refuses a changed config, and every fine-tuning option either works or is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from test_retrieval_qa import TOPICS

from pilelm.core import cli
from pilelm.core.manifest import read_manifest
from pilelm.evaluation.retrieval import dense_scores, gold_ranks, rank_metrics
from pilelm.inference.text_encoder import TextEncoder
from pilelm.retrieval import contrastive
from pilelm.training.checkpoint import load_for_inference

ALL_TRAIN = ["val_ratio=0", "test_ratio=0", "loop.tensorboard=false", "loop.num_threads=1"]


def _pairs_file(path, negatives: bool = False):
    path.write_text("".join(json.dumps({"query": q, "positive": a} | (
        {"negative": TOPICS[(i + 1) % len(TOPICS)][1]} if negatives else {})) + "\n" for i, (q, a) in enumerate(TOPICS)))
    return path


def _mrr(run) -> float:
    enc = TextEncoder.from_run(run)
    scores, _ = dense_scores(enc, [q for q, _ in TOPICS], [a for _, a in TOPICS])
    return rank_metrics(gold_ranks(scores))["mrr@10"]


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(run) -> dict[str, torch.Tensor]:
    model, _, _ = load_for_inference(run)
    return model.state_dict()


def test_contrastive_fine_tuning_learns_its_pairs(tiny_run, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune-contrastive", str(tiny_run), "--pairs", str(_pairs_file(tmp_path / "pairs.jsonl")),
            "-o", str(out), "loop.max_steps=40", "loop.batch_size=6", "optim.lr=3e-3", "schedule.warmup_steps=2",
            *ALL_TRAIN]
    assert cli.main(argv) == 0
    m = read_manifest(out)
    assert m["stage"] == "train" and m["extra"]["objective"] == "contrastive"
    assert m["counts"]["final_loss"] < m["counts"]["first_loss"]
    assert _mrr(out) > _mrr(tiny_run)
    assert _mrr(out) == 1.0


def test_contrastive_fine_tuning_with_hard_negatives(tiny_run, tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", negatives=True)
    out = tmp_path / "ft"
    assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(out), "loop.max_steps=30",
                     "loop.batch_size=6", "optim.lr=3e-3", "schedule.warmup_steps=2", *ALL_TRAIN]) == 0
    m = read_manifest(out)
    assert m["counts"]["hard_negatives"] == len(TOPICS)
    assert m["counts"]["final_loss"] < m["counts"]["first_loss"]
    assert _mrr(out) > _mrr(tiny_run)


def test_a_killed_contrastive_run_resumes_to_the_same_weights(tiny_run, tmp_path, monkeypatch):
    """With dropout on (head.dropout, default 0.1): the RNG is part of the training state."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["--pairs", str(pairs), "loop.max_steps=6", "loop.batch_size=4", "loop.eval_every=3", "optim.lr=1e-3",
              "loop.log_every=1", *ALL_TRAIN]
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "whole"), *common]) == 0
    real, calls = contrastive.info_nce, []

    def dies_at_step_5(q, p, t, negatives=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(q, p, t, negatives)

    monkeypatch.setattr(contrastive, "info_nce", dies_at_step_5)
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "cut"), *common]) == 130
    monkeypatch.setattr(contrastive, "info_nce", real)
    assert cli.main(["finetune-contrastive", str(tiny_run), "-o", str(tmp_path / "cut"), *common]) == 0
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "cut")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, rtol=0, atol=0)


def test_finetune_task_contrastive_is_finetune_contrastive(tiny_run, tmp_path):
    """`pilelm finetune --task contrastive` and `pilelm finetune-contrastive` are one training."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["loop.max_steps=6", "loop.batch_size=6", "optim.lr=3e-3", "schedule.warmup_steps=2", "loop.log_every=1",
              *ALL_TRAIN]
    assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(tmp_path / "a"),
                     *common]) == 0
    assert cli.main(["finetune", str(tiny_run), "--task", "contrastive", "--data", str(pairs), "-o",
                     str(tmp_path / "b"), *common]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 6


def test_old_flags_are_refused_with_their_new_names(tiny_run, tmp_path, capsys):
    pairs = str(_pairs_file(tmp_path / "pairs.jsonl"))
    for old, new in (("--steps", "loop.max_steps"), ("--lr", "optim.lr"), ("--batch-size", "loop.batch_size"),
                     ("--save-every", "loop.eval_every")):
        assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", pairs, "-o", str(tmp_path / "x"),
                         old, "4"]) == 2
        assert f"is now {new}" in capsys.readouterr().err
    assert cli.main(["finetune-contrastive", str(tiny_run), "--pairs", pairs, "-o", str(tmp_path / "x"),
                     "steps=4"]) == 2
    assert "'steps' is now loop.max_steps" in capsys.readouterr().err


def test_a_contrastive_run_refuses_to_resume_with_another_config(tiny_run, tmp_path, capsys):
    """Resuming with another learning rate would not give the uninterrupted run's weights: refused,
    naming the key; more steps (how long it runs) resume."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    common = ["finetune-contrastive", str(tiny_run), "--pairs", str(pairs), "-o", str(tmp_path / "ft"),
              "loop.batch_size=4", "loop.eval_every=2", *ALL_TRAIN]
    assert cli.main([*common, "loop.max_steps=2", "optim.lr=1e-3"]) == 0
    assert cli.main([*common, "loop.max_steps=4", "optim.lr=2e-3"]) == 1
    assert "optim.lr: 0.001 -> 0.002" in capsys.readouterr().err
    assert cli.main([*common, "loop.max_steps=4", "optim.lr=1e-3"]) == 0
    assert read_manifest(tmp_path / "ft")["counts"]["steps"] == 4


def test_validation_pairs_pick_the_best_and_stop_early(tiny_run, tmp_path):
    """val_data / test_data / patience: validated by MRR@10, the best step kept, stopped early."""
    pairs = str(_pairs_file(tmp_path / "pairs.jsonl"))
    out = tmp_path / "ft"
    assert cli.main(["finetune", str(tiny_run), "--task", "contrastive", "--data", pairs, "--val-data", pairs,
                     "--test-data", pairs, "-o", str(out), "loop.max_steps=40", "loop.batch_size=6",
                     "loop.eval_every=2", "loop.patience=2", "loop.min_delta=5", "optim.lr=3e-3",
                     "loop.tensorboard=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == 2 and results["steps"] == 6  # nothing beats the first MRR by 5
    assert 0 < results["test"]["mrr@10"] <= 1
    vals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_metric" in r]
    assert [r["step"] for r in vals] == [2, 4, 6]
    assert read_manifest(out)["counts"]["best_step"] == 2


def _run(tiny_run, tmp_path, name, *extra) -> list[float]:
    pairs = str(_pairs_file(tmp_path / "pairs.jsonl"))
    out = tmp_path / name
    assert cli.main(["finetune", str(tiny_run), "--task", "contrastive", "--data", pairs, "-o", str(out),
                     "loop.max_steps=3", "loop.batch_size=4", "loop.log_every=1", "optim.lr=3e-3",
                     "schedule.warmup_steps=0", *ALL_TRAIN, *extra]) == 0
    return _losses(out)


@pytest.fixture(scope="module")
def base_losses(tiny_run, tmp_path_factory) -> list[float]:
    """The default run's losses; a second run repeats them exactly."""
    base = _run(tiny_run, tmp_path_factory.mktemp("base"), "base")
    assert base == _run(tiny_run, tmp_path_factory.mktemp("again"), "again") and len(base) == 3
    return base


@pytest.mark.parametrize("option", ["optim.grad_clip=1e-4", "optim.name=lamb", "optim.beta1=0.5",
                                    "schedule.kind=constant", "head.dropout=0.0", "lora.r=2",
                                    "loop.group_by_length=false"])
def test_every_option_changes_the_training(tiny_run, tmp_path, base_losses, option):
    """Options the old contrastive loop silently ignored now act (a loss after the first update
    moves, or the first itself for dropout and bf16)."""
    changed = _run(tiny_run, tmp_path, "changed", option)
    assert len(changed) == 3 and changed != base_losses


def test_precision_is_applied_or_refused_by_name(tiny_run, tmp_path, base_losses, capsys):
    """bf16 autocast trains in bf16 where the CPU has it (other losses), else is refused."""
    from pilelm.training.precision import resolve_precision

    try:
        resolve_precision("bf16-autocast", torch.device("cpu"))
    except ValueError:
        with pytest.raises(AssertionError):
            _run(tiny_run, tmp_path, "bf16", "loop.precision=bf16-autocast")
        assert "loop.precision=bf16-autocast" in capsys.readouterr().err
        return
    assert _run(tiny_run, tmp_path, "bf16", "loop.precision=bf16-autocast") != base_losses


def test_lora_trains_adapters_and_merges_them(tiny_run, tmp_path):
    _run(tiny_run, tmp_path, "lora", "lora.r=2")
    m = read_manifest(tmp_path / "lora")
    assert m["counts"]["trainable_parameters"] < m["counts"]["parameters"] / 5
    base, tuned = _weights(tiny_run), _weights(tmp_path / "lora")
    assert set(base) == set(tuned)  # merged: the base model's names, no lora_ tensors
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_device_auto_is_the_fine_tuning_device(tiny_run, tmp_path):
    from pilelm.finetune.config import FinetuneConfig
    from pilelm.training.distributed import pick_device

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    cfg = FinetuneConfig(run=str(tiny_run), task="contrastive", data=[str(pairs)], output=str(tmp_path / "o"),
                         val_ratio=0, test_ratio=0)
    trainer = contrastive.ContrastiveTrainer(cfg, {"train": contrastive.read_pairs([pairs]), "val": []})
    assert trainer.device == pick_device("auto")


@pytest.mark.parametrize(("task", "option", "named"), [
    ("contrastive", "text_column=body", "text_column (read by classify, punct)"),
    ("contrastive", "sft.pack=false", "sft (read by sft)"),
    ("sft", "head.dropout=0.3", "head.dropout"),
    ("classify", "contrastive.temperature=0.1", "contrastive (read by contrastive)"),
    ("ner", "head.pooling=mean", "head.pooling (read by classify, contrastive)"),
])
def test_an_option_the_task_does_not_read_is_refused_by_name(tiny_run, tmp_path, capsys, task, option, named):
    pairs = str(_pairs_file(tmp_path / "pairs.jsonl"))
    assert cli.main(["finetune", str(tiny_run), "--task", task, "--data", pairs, "-o", str(tmp_path / "o"),
                     option]) == 2
    err = capsys.readouterr().err
    assert f"task {task} does not use {named}" in err
