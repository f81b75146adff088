"""A fine-tune directory holds one run: a fresh start (resume=false, or nothing to resume)
first removes what an earlier run left, and a resume refuses data whose contents changed
(issue #29 items 2, 3, 5, 6)."""

from __future__ import annotations

import json
import shutil

import pytest
from ft_helpers import write_classification
from test_sft import write_pairs

from pilelm.core.cli import main
from pilelm.core.manifest import MANIFEST
from pilelm.training import checkpoint as ckpt_io

FAST = ["loop.num_threads=1", "loop.tensorboard=false", "loop.batch_size=8", "loop.eval_every=5"]


@pytest.fixture()
def cls(tmp_path) -> dict[str, str]:
    return {s: str(write_classification(tmp_path / f"{s}.jsonl", n, seed))
            for s, n, seed in (("train", 80, 0), ("val", 20, 1), ("test", 20, 2))}


def _cls_args(files: dict[str, str]) -> list[str]:
    return ["--task", "classify", "--data", files["train"], "--val-data", files["val"], "--test-data", files["test"]]


def test_resume_false_discards_the_old_runs_checkpoints(tiny_run, cls, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *_cls_args(cls), "loop.max_steps=20"]) == 0
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [20]
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *_cls_args(cls), "loop.max_steps=10",
                 "optim.lr=3e-4", "resume=false"]) == 0
    # keep-last pruning would have kept the old run's step 20 (the higher one)
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [10]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10 and results["best_step"] <= 10
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10


def test_a_fresh_start_replaces_the_tokenizer(tiny_run, cls, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", str(tiny_run), "-o", str(out), *FAST, *_cls_args(cls), "loop.max_steps=5"]
    assert main(args) == 0
    (out / "tokenizer" / "stale_role_tokens.json").write_text("{}")
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    assert main([*args, "resume=false"]) == 0
    assert not (out / "tokenizer" / "stale_role_tokens.json").exists()
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer" / "tokenizer.json").read_bytes()


def test_resume_compares_data_by_content_not_name(tiny_run, cls, tmp_path, capsys):
    out = tmp_path / "ft"
    args = [*FAST, "loop.max_steps=20"]
    assert main(["finetune", str(tiny_run), "-o", str(out), *_cls_args(cls), *args, "loop.stop_at_step=5"]) == 0
    # the same name, other labels: refused, naming the file and both hashes
    original = open(cls["train"]).read()
    lines = [json.loads(x) for x in original.splitlines()]
    for r in lines[:10]:
        r["label"] = "fruit" if r["label"] == "animal" else "animal"
    with open(cls["train"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    assert main(["finetune", str(tiny_run), "-o", str(out), *_cls_args(cls), *args]) == 1
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and f"data: the contents changed: {cls['train']}" in err
    # the same contents under another name resume
    with open(cls["train"], "w") as f:
        f.write(original)
    moved = dict(cls, train=str(tmp_path / "moved.jsonl"))
    shutil.copy(cls["train"], moved["train"])
    assert main(["finetune", str(tiny_run), "-o", str(out), *_cls_args(moved), *args]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 20


def test_a_killed_fresh_sft_run_leaves_no_old_manifest_or_results(tiny_run, tmp_path, monkeypatch):
    from pilelm.finetune.sft.trainer import SftTrainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", 80, 0)
    out = tmp_path / "sft"
    args = ["finetune", str(tiny_run), "-o", str(out), "--task", "sft", "--data", str(pairs), *FAST,
            "loop.max_steps=5", "sft.before=false", "sft.eval_generations=2"]
    assert main(args) == 0
    assert (out / MANIFEST).is_file() and (out / "results.json").is_file()

    def killed(self):
        raise KeyboardInterrupt  # as kill -9 in the first step: nothing after it runs

    monkeypatch.setattr(SftTrainer, "train_step", killed)
    assert main([*args, "optim.lr=3e-3", "resume=false"]) == 130
    assert not (out / MANIFEST).exists() and not (out / "results.json").exists()
    assert not (out / "results.md").exists()
    assert ckpt_io.list_checkpoints(out) == []  # the old best model is gone too: nothing to serve


def test_loop_epochs_sets_the_steps(tiny_run, cls, tmp_path):
    """80 - no held-out records (explicit val/test files) = 80 training examples, 8 per step:
    1.5 epochs = 15 steps; max_steps still ends the run first when lower."""
    out = tmp_path / "ep"
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *_cls_args(cls), "loop.epochs=1.5",
                 "loop.max_steps=1000"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 15
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "cap"), *FAST, *_cls_args(cls), "loop.epochs=3",
                 "loop.max_steps=7"]) == 0
    assert json.loads((tmp_path / "cap" / "results.json").read_text())["steps"] == 7


def test_finetune_help_shows_the_fine_tuning_defaults(capsys):
    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "optim.lr=0.0001 " in text and "optim.beta2=0.999 " in text and "optim.weight_decay=0.01 " in text
    assert "schedule.warmup_steps=20 " in text and "schedule.min_lr_ratio=0.0 " in text
    assert "loop.epochs=0.0 " in text
    assert main(["finetune-contrastive", "--help"]) == 0
    assert "optim.lr=0.0001 " in capsys.readouterr().out
