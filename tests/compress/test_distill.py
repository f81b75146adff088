"""`pilelm distill`: the loss's invariants, the trainer hook, resume, the tokenizer refusal."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pilelm.compress.distill import (
    DistillConfig,
    DistillLossConfig,
    TeacherTargets,
    distillation_loss,
    run_distill,
)
from pilelm.core import cli
from pilelm.core.config import load_config
from pilelm.core.manifest import read_manifest
from pilelm.models.spec import IGNORE_INDEX
from pilelm.training.checkpoint import latest_checkpoint, load_for_inference
from pilelm.training.config import load_run_config
from pilelm.training.trainer import run_train


def _config(teacher, data, out, **overrides) -> DistillConfig:
    base = {
        "teacher": str(teacher), "data": str(data), "output": str(out),
        "model": {"n_layer": 1, "n_head": 2, "d_model": 64, "block_size": 32},
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
        "loop": {"max_steps": 6, "micro_batch": 4, "log_every": 1, "eval_every": 6, "eval_windows": 4,
                 "save_every": 3, "num_threads": 1, "precision": "fp32", "peak_flops": 1e12,
                 "tensorboard": False},
    }
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (base.setdefault(section, {}) if section else base)[name] = value
    return load_config(DistillConfig, overrides=base)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("top_k", [0, 7])
def test_kl_part_is_zero_when_the_student_is_the_teacher(top_k):
    torch.manual_seed(0)
    V = 7
    logits = torch.randn(2, 5, V) * 3
    labels = torch.randint(0, V, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    cfg = DistillLossConfig(temperature=2.0, kl_weight=0.5, lm_weight=0.5, top_k=top_k)
    targets = TeacherTargets(logits) if not top_k else TeacherTargets(*logits.topk(top_k, dim=-1))
    loss, lm, kl = distillation_loss(logits, labels, targets, cfg)
    assert kl.abs() < 1e-6
    assert loss == pytest.approx(0.5 * float(lm), abs=1e-6)
    # Another student: the KL is positive and the loss mixes both terms with T^2 on the KL.
    other = logits + torch.randn_like(logits)
    loss2, lm2, kl2 = distillation_loss(other, labels, targets, cfg)
    assert kl2 > 1e-3
    assert loss2 == pytest.approx(0.5 * float(lm2) + 0.5 * 4.0 * float(kl2), rel=1e-5)
    # With top-k < V the student is also charged for the mass it puts outside the teacher's k tokens.
    cfg3 = DistillLossConfig(top_k=3)
    _, _, kl3 = distillation_loss(logits, labels, TeacherTargets(*logits.topk(3, dim=-1)), cfg3)
    assert kl3 > 0


def test_distill_trains_the_student_on_the_trainer(tiny_run, tiny_shards, tmp_path):
    """A half-depth student: the loop is the trainer's (checkpoints, config.yaml, metrics), the
    manifest says distill, and the student loads for inference."""
    out = run_distill(_config(tiny_run, tiny_shards, tmp_path / "student", **{"distill.student_layers": 1}))
    manifest = read_manifest(out)
    assert manifest["stage"] == "distill"
    assert manifest["counts"]["steps"] == 6 and "val_bpb" in manifest["counts"]
    student_cfg = load_run_config(out)  # a plain train config: `pilelm train --config` retrains it alone
    teacher, tcfg, _ = load_for_inference(tiny_run)
    assert student_cfg.model.n_layer == 1 and student_cfg.model.d_model == tcfg.d_model
    assert student_cfg.model.vocab_size == tcfg.vocab_size
    model, cfg, _ = load_for_inference(out)
    assert cfg.n_layer == 1
    losses = _losses(out)
    assert losses[-1] < losses[0]


def test_resume_after_stop_reproduces_the_uninterrupted_run(tiny_run, tiny_shards, tmp_path):
    kw = {"distill.top_k": 16, "distill.cache": True}
    full = run_distill(_config(tiny_run, tiny_shards, tmp_path / "full", **kw))
    part = tmp_path / "part"
    run_distill(_config(tiny_run, tiny_shards, part, **kw, **{"loop.stop_at_step": 3}))
    assert not (part / "manifest.json").exists()
    run_distill(_config(tiny_run, tiny_shards, part, **kw))
    assert _losses(part) == pytest.approx(_losses(full), rel=1e-6)
    a = load_file(str(latest_checkpoint(full) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(part) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any((part / "teacher_topk").glob("*.safetensors"))
    # The cache holds what the teacher computes: the same run without it has the same losses.
    uncached = run_distill(_config(tiny_run, tiny_shards, tmp_path / "uncached", **{"distill.top_k": 16}))
    assert _losses(uncached) == pytest.approx(_losses(full), rel=1e-6)
    assert not (uncached / "teacher_topk").exists()


def test_the_cli_and_a_baseline_from_the_students_config(tiny_run, tiny_shards, tmp_path):
    """`pilelm distill` from the command line; the same student trained alone from its config.yaml
    sees the same steps and data (what the compress report compares)."""
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(tiny_run), "--data", str(tiny_shards), "-o", str(out),
            "model.n_layer=1", "model.n_head=2", "model.d_model=64", "model.block_size=32",
            "loop.max_steps=3", "loop.micro_batch=4", "loop.eval_every=0", "loop.save_every=3",
            "loop.num_threads=1", "loop.precision=fp32", "loop.peak_flops=1e12", "loop.tensorboard=false",
            "distill.kl_weight=1.0", "distill.lm_weight=0.0"]
    assert cli.main(args) == 0
    baseline = run_train(load_config(type(load_run_config(out)), str(out / "config.yaml"),
                                     {"output": str(tmp_path / "baseline")}))
    assert read_manifest(baseline)["counts"]["steps"] == read_manifest(out)["counts"]["steps"] == 3
    assert load_run_config(baseline).model == load_run_config(out).model


def test_a_teacher_with_another_tokenizer_is_refused(tiny_run, tiny_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="distill: .* have different tokenizers .*pilelm tokenize"):
        run_distill(_config(other, tiny_shards, tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_config_errors_name_the_key(tiny_run, tiny_shards, tmp_path):
    with pytest.raises(ValueError, match="distill.cache .* distill.top_k"):
        _config(tiny_run, tiny_shards, tmp_path / "x", **{"distill.cache": True})
    with pytest.raises(ValueError, match="distill.temperature"):
        _config(tiny_run, tiny_shards, tmp_path / "x", **{"distill.temperature": 0})
    with pytest.raises(ValueError, match="model.vocab_size=999 differs from the teacher's"):
        run_distill(_config(tiny_run, tiny_shards, tmp_path / "x", **{"model.vocab_size": 999}))
    with pytest.raises(ValueError, match="model.block_size=512 is longer"):
        run_distill(_config(tiny_run, tiny_shards, tmp_path / "x", **{"model.block_size": 512}))
