"""The exported config's special ids agree with the exported tokenizer's, so a batched
``transformers.pipeline`` (which pads with the tokenizer's pad token) pools the same token
as an unbatched one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_run
from ft_helpers import write_classification

from pilelm.core.cli import main

FAST = ["loop.num_threads=1", "loop.tensorboard=false"]


def _agree(folder: Path) -> dict[str, int]:
    """{name: id} of the tokenizer's pad / bos / eos tokens, checked equal to config.json's."""
    from transformers import AutoConfig, AutoTokenizer

    tok, cfg = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    ids = {}
    for name in ("pad", "bos", "eos"):
        token_id = getattr(tok, f"{name}_token_id")
        if token_id is not None:
            assert getattr(cfg, f"{name}_token_id") == token_id, name
            ids[name] = token_id
    assert "pad" in ids, "a batched pipeline needs a pad token"
    return ids


@pytest.mark.parametrize("specials", [("<|endoftext|>", "<|padding|>"), ("<|endoftext|>",)],
                         ids=["own-pad", "no-pad"])
def test_exported_classifier_pads_as_its_tokenizer(specials, tmp_path):
    from transformers import pipeline

    run = make_tiny_run(tmp_path / "run", special_tokens=specials)
    files = {s: write_classification(tmp_path / f"{s}.jsonl", n, i) for i, (s, n) in
             enumerate((("train", 96), ("val", 16)))}
    ft = tmp_path / "ft"
    assert main(["finetune", str(run), "-o", str(ft), "--task", "classify", "--data", str(files["train"]),
                 "--val-data", str(files["val"]), "loop.max_steps=30", "loop.eval_every=30", "optim.lr=3e-3",
                 *FAST]) == 0
    hf = tmp_path / "hf"
    assert main(["export", str(ft), "-o", str(hf)]) == 0
    ids = _agree(hf)
    assert ids["pad"] == (1 if "<|padding|>" in specials else 0)
    lm = tmp_path / "lm"
    assert main(["export", str(run), "-o", str(lm)]) == 0
    _agree(lm) if "<|padding|>" in specials else None
    assert json.loads((lm / "generation_config.json").read_text())["eos_token_id"] == 0

    clf = pipeline("text-classification", model=str(hf), tokenizer=str(hf), device="cpu")
    # Lengths differ, so the batch pads; every text's label and score must be its unbatched one.
    texts = ["apple", "zebra lion tiger horse camel zebra", "banana cherry grape", "lion melon",
             "horse horse horse horse horse horse horse horse apple"]
    alone = [clf(t)[0] for t in texts]
    batched = clf(texts, batch_size=len(texts))
    assert [b["label"] for b in batched] == [a["label"] for a in alone]
    assert [b["score"] for b in batched] == pytest.approx([a["score"] for a in alone], abs=1e-5)
