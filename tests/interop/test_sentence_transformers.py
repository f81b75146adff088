"""`pilelm export RUN --format sentence-transformers`: SentenceTransformer(folder).encode gives
pilelm's embedding vectors (pooling and normalisation included) within 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_run

from pilelm.core.cli import main
from pilelm.inference.text_encoder import TextEncoder

sentence_transformers = pytest.importorskip("sentence_transformers")

# Different lengths, so a batch pads and a padded token leaking into a vector would show.
TEXTS = ["the quick brown fox", "a", *TINY_TEXTS[:3], "jumps over the lazy dog " * 3]


def _assert_same_vectors(run: Path, folder: Path, pooling: str) -> None:
    ours = TextEncoder.from_run(run, pooling=pooling).embed_queries(TEXTS)
    st = sentence_transformers.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    theirs = st.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    assert theirs.shape == ours.shape and np.allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    assert np.abs(ours @ ours.T - np.eye(len(TEXTS))).max() > 1e-3  # distinct vectors, not a constant
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_gpt_embedder_exports_to_sentence_transformers(pooling, tiny_run, tmp_path):
    out = tmp_path / "st"
    assert main(["export", str(tiny_run), "--format", "sentence-transformers", "--pooling", pooling,
                 "-o", str(out)]) == 0
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == (
        "mean" if pooling == "mean" else "lasttoken")
    _assert_same_vectors(tiny_run, out, pooling)


def test_contrastive_recipe_run_exports_with_its_trained_pooling(tmp_path):
    """A contrastive fine-tune of the cpu-10min form (Qwen3), pooling=last: auto finds it."""
    from test_shipped_configs import RECIPE

    base = make_tiny_run(tmp_path / "base", arch="neox", n_head=4, block_size=64, model_options=RECIPE)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": t.split()[0], "positive": t}) + "\n" for t in TINY_TEXTS * 4))
    run = tmp_path / "contrastive"
    assert main(["finetune-contrastive", str(base), "--pairs", str(pairs), "-o", str(run), "--pooling", "last",
                 "steps=3", "batch_size=4"]) == 0
    out = tmp_path / "st"
    assert main(["export", str(run), "--format", "sentence-transformers", "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["extra"]["pooling"] == "last"
    _assert_same_vectors(run, out, "last")


def test_bert_embedder_exports_with_cls_pooling(tmp_path):
    from pilelm.core import manifest
    from pilelm.models.bert import Bert, BertConfig
    from pilelm.tokens.tokenizer_train import train_tokenizer
    from pilelm.training import checkpoint

    run = tmp_path / "run"
    train_tokenizer(TINY_TEXTS * 4, "wordpiece", vocab_size=200, min_frequency=1).save(run / "tokenizer")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=64, dropout=0.0)
    ckpt = run / "checkpoints" / checkpoint.step_dir_name(1)
    checkpoint.save_model(ckpt, Bert(cfg), cfg)
    checkpoint.mark_complete(ckpt)
    manifest.write_manifest(run, "train", {"model": {}})
    for pooling in ("cls", "mean"):
        out = tmp_path / f"st-{pooling}"
        assert main(["export", str(run), "--format", "sentence-transformers", "--pooling", pooling,
                     "-o", str(out)]) == 0
        _assert_same_vectors(run, out, pooling)


def test_cls_pooling_of_a_causal_model_is_refused_before_writing(tiny_run, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["export", str(tiny_run), "--format", "sentence-transformers", "--pooling", "cls",
                 "-o", str(out)]) == 1
    assert "pooling=cls needs a BERT" in capsys.readouterr().err and not out.exists()
