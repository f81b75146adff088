"""Helpers for the fine-tuning tests: tiny BERT runs and labelled files (a module, not a
conftest.py: one here would shadow the root conftest, which tests import as `conftest`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


SENTENCES = [
    "The cat saw the park.", "Did a dog like paris?", "My friend called london, and then the teacher left.",
    "Our team visited a house.", "Did the teacher find the river?", "The dog found paris, and the cat slept.",
]
