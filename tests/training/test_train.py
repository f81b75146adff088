"""`pilelm train`: the run-dir contract, exact resume, checkpoint fallback, non-finite guard,
gradient accumulation, precisions, BERT. Tiny models (2 layers, d=64, vocab 128)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pilelm.core.config import load_config
from pilelm.core.manifest import read_manifest, write_manifest
from pilelm.training import checkpoint
from pilelm.training.trainer import NonFiniteLossError, TrainConfig, load_run_config, run_train

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]
WORDS = [f"w{i}" for i in range(100 - len(SPECIALS))]
EOD = SPECIALS.index("<|endoftext|>")


def synthetic_documents(n: int, seed: int) -> list[list[int]]:
    """Token documents from a sparse Markov chain (learnable: each word has 3 successors)."""
    rng = np.random.default_rng(seed)
    first = len(SPECIALS)
    succ = np.random.default_rng(0).integers(first, first + len(WORDS), (first + len(WORDS), 3))
    docs = []
    for _ in range(n):
        t = int(rng.integers(first, first + len(WORDS)))
        doc = [t]
        for _ in range(int(rng.integers(20, 120))):
            t = int(succ[t, rng.integers(0, 3)])
            doc.append(t)
        docs.append(doc)
    return docs


def write_tokenizer(tok_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))


def make_shards(root: Path, n_train: int = 120, n_val: int = 12) -> Path:
    """A token shard dir in the `pilelm tokenize` layout, written with pilelm.tokens.shards."""
    from pilelm.tokens.mmidx import write_indexed_dataset
    from pilelm.tokens.shards import save_docmeta

    root.mkdir(parents=True, exist_ok=True)
    write_tokenizer(root / "tokenizer")
    counts = {}
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        docs = [d + [EOD] for d in synthetic_documents(n, seed)]
        write_indexed_dataset(root / split, docs, np.uint16)
        # Each word stands for 3 bytes of text plus a space; EOD for none.
        save_docmeta(root / f"{split}.docmeta.npz", np.zeros(n, np.int16),
                     np.array([4 * (len(d) - 1) for d in docs], np.int64))
        (root / f"{split}.components.json").write_text(json.dumps(["Synthetic"]))
        counts[split] = {"documents": n, "tokens": sum(map(len, docs))}
    write_manifest(root, "tokenize", {}, counts={"splits": counts},
                   extra={"tokenizer": {"eod_id": EOD, "vocab_size": len(SPECIALS) + len(WORDS), "kind": "wordlevel"}})
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = {
        "data": str(data),
        "output": str(out),
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 3},
        "loop": {"max_steps": 8, "micro_batch": 4, "log_every": 1, "eval_every": 4, "eval_windows": 8,
                 "save_every": 4, "num_threads": 1, "precision": "fp32", "peak_flops": 1e12,
                 "tensorboard": False},
    }
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (base.setdefault(section, {}) if section else base)[name] = value
    return load_config(TrainConfig, overrides=base)


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_run_dir_contract(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", **{"loop.peak_flops": 0.0, "loop.tensorboard": True,
                                                   "loop.keep_last": 1})
    run = run_train(cfg)
    assert run == tmp_path / "run"
    manifest = read_manifest(run)
    assert manifest["stage"] == "train" and manifest["counts"]["steps"] == 8
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (shards / "tokenizer" / "tokenizer.json").read_bytes()
    resolved = load_run_config(run)
    assert resolved.model.vocab_size == 128  # 100 rounded up to a multiple of 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 32 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_bpb"] > 0 and math.isfinite(r["val_loss"]) for r in evals)
    # bpb = nll / ln 2 / bytes; here ~4 bytes per token, so bpb ~ val_loss / ln 2 / 4.
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) / 4, rel=0.1)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert rows[0]["lr"] < rows[2]["lr"]  # warmup
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [8]  # keep_last=1
    ckpt = checkpoint.list_checkpoints(run)[-1][1]
    assert checkpoint.verify_checkpoint(ckpt) is None
    assert (run / "hardware.json").is_file() and list((run / "tensorboard").iterdir())
    model, mcfg, tok = checkpoint.load_for_inference(run)
    assert mcfg.vocab_size == 128 and tok == run / "tokenizer" and not model.training
    logits, _ = model(torch.tensor([[EOD, 7, 8]]))
    assert logits.shape == (1, 3, 128)


def test_rerunning_a_finished_run_changes_nothing(shards, tmp_path):
    run = run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    before = [(run / name).read_text() for name in ("metrics.jsonl", "manifest.json")]
    run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 4}))
    assert [(run / name).read_text() for name in ("metrics.jsonl", "manifest.json")] == before
    # Raising max_steps trains on from the last checkpoint.
    run_train(tiny_config(shards, tmp_path / "run", **{"loop.max_steps": 6}))
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    assert read_manifest(run)["counts"]["steps"] == 6


@pytest.mark.parametrize("precision", ["fp32", *(pytest.param(p, marks=pytest.mark.native_bf16)
                                                 for p in ("bf16-autocast", "bf16"))])
def test_resume_reproduces_the_uninterrupted_losses(shards, tmp_path, precision):
    kw = {"loop.max_steps": 20, "loop.save_every": 5, "loop.eval_every": 0, "loop.precision": precision,
          "model.dropout": 0.1}
    straight = run_train(tiny_config(shards, tmp_path / "straight", **kw))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)  # clipping sees the gradients (fp32 masters too)
    resumed_dir = tmp_path / "resumed"
    run_train(tiny_config(shards, resumed_dir, **kw, **{"loop.stop_at_step": 10}))
    assert not (resumed_dir / "manifest.json").exists()  # stopped runs are unfinished
    assert [s for s, _ in losses(resumed_dir)] == list(range(1, 11))
    run_train(tiny_config(shards, resumed_dir, **kw))
    assert losses(resumed_dir) == losses(straight)  # bit-identical per-step losses
    a = checkpoint.load_model(checkpoint.latest_checkpoint(straight))[0].state_dict()
    b = checkpoint.load_model(checkpoint.latest_checkpoint(resumed_dir))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoint_falls_back_to_the_previous_one(shards, tmp_path, caplog):
    kw = {"loop.max_steps": 12, "loop.save_every": 4, "loop.eval_every": 0, "loop.keep_last": 3}
    straight = run_train(tiny_config(shards, tmp_path / "straight", **kw))
    run = tmp_path / "run"
    run_train(tiny_config(shards, run, **kw, **{"loop.stop_at_step": 8}))
    newest = checkpoint.latest_checkpoint(run)
    assert newest.name == "step_00000008"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    half_written = run / "checkpoints" / "step_00000010"
    half_written.mkdir()  # a save killed before COMPLETE
    (half_written / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        run_train(tiny_config(shards, run, **kw))
    assert any("step_00000008" in r.message and "damaged" in r.message for r in caplog.records)
    assert losses(run) == losses(straight)  # resumed from step 4, the same numbers


def test_gradient_accumulation_equals_the_large_batch(shards, tmp_path):
    big = run_train(tiny_config(shards, tmp_path / "big", **{"loop.micro_batch": 8, "loop.max_steps": 4}))
    acc = run_train(tiny_config(shards, tmp_path / "acc", **{"loop.micro_batch": 2, "loop.tokens_per_step": 8 * 32,
                                                             "loop.max_steps": 4}))
    assert read_manifest(acc)["counts"]["tokens"] == 4 * 8 * 32
    for (s1, l1), (s2, l2) in zip(losses(big), losses(acc), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_activation_checkpointing_and_fused_loss_do_not_change_the_numbers(shards, tmp_path):
    ref = run_train(tiny_config(shards, tmp_path / "ref", **{"loop.max_steps": 3, "loop.fused_loss": False}))
    alt = run_train(tiny_config(shards, tmp_path / "alt", **{"loop.max_steps": 3, "loop.activation_checkpointing": True}))
    for (_, a), (_, b) in zip(losses(ref), losses(alt), strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss(shards, tmp_path, monkeypatch, mode):
    from pilelm.models.gpt import GPT

    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        logits, loss = real(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] == 3:  # the third training step
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = tiny_config(shards, tmp_path / "run", **{"loop.on_nonfinite": mode, "loop.eval_every": 0,
                                                   "loop.max_steps": 5})
    if mode == "stop":
        with pytest.raises(NonFiniteLossError, match="step 3"):
            run_train(cfg)
        return
    run = run_train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert all(math.isfinite(r["loss"]) for r in rows if not r.get("skipped"))
    model = checkpoint.load_model(checkpoint.latest_checkpoint(run))[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bert_with_nsp_trains_and_saves(shards, tmp_path):
    pytest.importorskip("pilelm.tokens.tokenizer")
    cfg = tiny_config(shards, tmp_path / "bert", **{
        "family": "bert", "bert": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32, "nsp": True,
                                   "dropout": 0.0},
        "loop.max_steps": 10, "loop.eval_every": 5, "optim.lr": 2e-3})
    run = run_train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 10]
    model, mcfg, _ = checkpoint.load_for_inference(run)
    assert type(model).__name__ == "Bert" and mcfg.nsp and mcfg.vocab_size == 128


def test_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ValueError, match="data"):
        run_train(tiny_config(Path(""), tmp_path / "x"))
    with pytest.raises(ValueError, match="model.vocab_size"):
        run_train(tiny_config(shards, tmp_path / "y", **{"model.vocab_size": 50}))
    with pytest.raises(ValueError, match="loop.micro_batch"):
        tiny_config(shards, tmp_path / "z", **{"loop.micro_batch": 0})


def test_cli_train_with_a_shipped_config(shards, tmp_path):
    from pilelm.core.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--data", str(shards), "-o", str(out), "--config", "tiny", "loop.max_steps=2",
               "model.block_size=32", "loop.num_threads=1", "loop.peak_flops=1e12", "loop.tensorboard=false"])
    assert rc == 0 and read_manifest(out)["counts"]["steps"] == 2
    shutil.rmtree(out)


def test_init_from_an_imported_model_continues_its_training(shards, tmp_path):
    """Train, export to transformers, import back, continue: the continued run starts at the
    pretrained loss, with the imported shape, and a foreign tokenizer is refused."""
    from pilelm.interop.hf import ExportConfig, ImportConfig, run_export, run_import

    pretrained = run_train(tiny_config(shards, tmp_path / "pre", **{"loop.max_steps": 40, "loop.eval_every": 0,
                                                                    "loop.save_every": 40}))
    hf_dir = run_export(ExportConfig(run=str(pretrained), output=str(tmp_path / "hf")))
    imported = run_import(ImportConfig(source=str(hf_dir), output=str(tmp_path / "imported")))
    kw = {"init_from": str(imported), "model.n_layer": 3, "model.dropout": 0.0, "loop.max_steps": 4,
          "loop.eval_every": 0}
    cont = run_train(tiny_config(shards, tmp_path / "cont", **kw))
    assert load_run_config(cont).model.n_layer == 2  # the shape comes from the imported model
    scratch = [loss for _, loss in losses(pretrained)]
    first = losses(cont)[0][1]
    assert first < scratch[0] - 1.0
    assert first == pytest.approx(sum(scratch[-5:]) / 5, abs=0.25)
    # A run with its own checkpoints resumes from them, not from init_from.
    run_train(tiny_config(shards, tmp_path / "cont", **{**kw, "loop.max_steps": 6}))
    assert [s for s, _ in losses(cont)] == [1, 2, 3, 4, 5, 6]

    other = tmp_path / "other_tokenizer"
    shutil.copytree(imported, other)
    vocab = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["w0"], vocab["model"]["vocab"]["w1"] = vocab["model"]["vocab"]["w1"], vocab["model"]["vocab"]["w0"]
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="init_from: .* have different tokenizers .*pilelm tokenize"):
        run_train(tiny_config(shards, tmp_path / "bad", **{**kw, "init_from": str(other)}))
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        run_train(tiny_config(shards, tmp_path / "bad", **{**kw, "init_from": str(tmp_path / "nowhere")}))


def _checkpoint_state(ckpt: Path) -> dict:
    """Everything a checkpoint holds but the seconds it took: weights, training state, RNG."""
    from safetensors.torch import load_file

    state = checkpoint.load_torch(ckpt / checkpoint.TRAIN_STATE)
    state.pop("elapsed_s")
    return {"weights": load_file(str(ckpt / "model.safetensors")), "train_state": state,
            "rng": checkpoint.load_torch(ckpt / checkpoint.rng_file(0))}


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_with_dropout_a_measured_peak_and_evals_is_bit_exact(shards, tmp_path, monkeypatch):
    """Interrupted after a checkpoint and rerun, a run with dropout, periodic evaluations and a
    measured MFU peak (a matmul benchmark at every start) saves the very checkpoints of the
    uninterrupted run: weights, optimizer, loader and RNG state (only elapsed_s differs)."""
    from pilelm.training import mfu
    from pilelm.training.precision import matmul_flops

    # The real measurement, in fp32 and once (bf16 matmuls crawl on CPUs without native bf16).
    monkeypatch.setattr(mfu, "best_measured_flops", lambda device: matmul_flops(device, torch.float32, 0.0))
    kw = {"loop.max_steps": 15, "loop.save_every": 5, "loop.eval_every": 3, "loop.keep_last": 0,
          "loop.peak_flops": 0.0, "model.dropout": 0.1}
    straight = run_train(tiny_config(shards, tmp_path / "straight", **kw))
    resumed = tmp_path / "resumed"
    run_train(tiny_config(shards, resumed, **kw, **{"loop.stop_at_step": 5}))
    run_train(tiny_config(shards, resumed, **kw))
    assert losses(resumed) == losses(straight)
    steps = [s for s, _ in checkpoint.list_checkpoints(straight)]
    assert steps == [5, 10, 15] == [s for s, _ in checkpoint.list_checkpoints(resumed)]
    for step in steps:
        _assert_same(_checkpoint_state(checkpoint.checkpoint_dir(straight, step)),
                     _checkpoint_state(checkpoint.checkpoint_dir(resumed, step)), f"step {step}")
