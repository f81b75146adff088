"""Helpers and fixtures for the fine-tuning tests (imported by the test modules: a conftest.py here
would shadow the root one, which tests import as `conftest`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import make_tiny_run

DATA = Path(__file__).parent / "data"
FRUIT = "apple banana cherry grape melon".split()
ANIMAL = "zebra lion tiger horse camel".split()


def make_tiny_bert_run(run_dir: Path, seed: int = 0) -> Path:
    """A run directory holding a random-init 2-layer BERT and a WordPiece tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from pilelm.core import manifest
    from pilelm.models.bert import Bert, BertConfig
    from pilelm.training import checkpoint

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    texts = [" ".join(FRUIT + ANIMAL), (DATA / "tiny.conll").read_text()] * 4
    tok.train_from_iterator(texts, trainer=trainer)
    (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(run_dir / "tokenizer" / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2, d_model=64, nsp=True)
    model = Bert(cfg)
    ckpt = run_dir / "checkpoints" / checkpoint.step_dir_name(1)
    checkpoint.save_model(ckpt, model, cfg)
    checkpoint.mark_complete(ckpt)
    manifest.write_manifest(run_dir, "train", {"family": "bert"}, counts={"steps": 0})
    return run_dir


@pytest.fixture(scope="session")
def neox_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("neox") / "run", arch="neox", block_size=64)


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory) -> Path:
    return make_tiny_bert_run(tmp_path_factory.mktemp("bert") / "run")


def write_classification(path: Path, n: int, seed: int) -> Path:
    """A separable two-label set: mostly fruit words or mostly animal words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["fruit", "animal"])
            words = [rng.choice(FRUIT if label == "fruit" else ANIMAL) for _ in range(6)] + [
                rng.choice(FRUIT + ANIMAL) for _ in range(2)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def cls_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls")
    return {"train": write_classification(d / "train.jsonl", 240, 0),
            "val": write_classification(d / "val.jsonl", 40, 1),
            "test": write_classification(d / "test.jsonl", 40, 2)}


SENTENCES = [
    "The cat saw the park.", "Did a dog like paris?", "My friend called london, and then the teacher left.",
    "Our team visited a house.", "Did the teacher find the river?", "The dog found paris, and the cat slept.",
]


@pytest.fixture(scope="session")
def punct_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("punct")
    rng = random.Random(0)
    out = {}
    for split, n in (("train", 300), ("val", 40)):
        (d / f"{split}.txt").write_text(" ".join(rng.choice(SENTENCES) for _ in range(n)))
        out[split] = d / f"{split}.txt"
    return out
