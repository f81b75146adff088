"""Tokenizer training, loading and the fast encoders (pilelm.tokens.tokenizer, tokenizer_train, fast_bpe)."""

from __future__ import annotations

import base64
import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, read_pile_shard, write_pile_shard

from pilelm.core.config import ConfigError, load_config
from pilelm.core.manifest import StageInputError, read_manifest, write_manifest
from pilelm.tokens.fast_bpe import tokenizer_from_ranks
from pilelm.tokens.tokenizer import PileTokenizer, load_tokenizer
from pilelm.tokens.tokenizer_train import StratifiedSample, TokenizerTrainConfig, run_tokenizer_train

SAMPLE = ROOT / "pilelm" / "sample"

# Texts the fast path must encode exactly as tokenizers does: non-NFC input (decomposed
# accents, a combining mark right after a special token), special-token strings inside
# text, whitespace runs of every kind, contractions, digits, scripts, emoji.
TRICKY = [
    "Cafe\u0301 A\u030angstro\u0308m  \u212b  e\u0301e\u0301",
    "end<|endoftext|>start <|padding|> <|endoftext|>\u0338 x<|endoftext|>",
    "a\tb\n\nc\r\n d   e \x0c f\x0bg\u00a0h\u2003i\u3000j\x85k\x1cl  \n  ",
    "I'm you're he'll we've she'd it's 'S 'LL O'Neil ''quoted''",
    "3.14159 1,000,000 0xDEADBEEF ½ ٣٤ 𝟘𝟙 x²",
    "東京 Москва عربى हिन्दी 한국어 😀👍🏽 🇺🇳",
    "def f(x):\n\treturn {'a': [1, 2]}  # note\n\n\n",
    "",
    " ",
    "\n",
]


def _tiny_corpus(root: Path) -> Path:
    """A prepared dir: slices of the bundled sample (real text, all components) and the tricky
    texts, train and val."""
    docs = read_pile_shard(SAMPLE / "train" / "00.jsonl.zst")[:120]
    train = [{"text": d["text"][:2500], "meta": d["meta"]} for d in docs]
    train += [{"text": t * 3, "meta": {"pile_set_name": "Tricky"}} for t in TRICKY]
    val = [{"text": d["text"][:2500], "meta": d["meta"]} for d in read_pile_shard(SAMPLE / "val.jsonl.zst")[:30]]
    val += [{"text": t, "meta": {"pile_set_name": "Tricky"}} for t in TRICKY]
    write_pile_shard(root / "train" / "00.jsonl.zst", train[::2])
    write_pile_shard(root / "train" / "01.jsonl.zst", train[1::2])
    write_pile_shard(root / "val" / "val.jsonl.zst", val)
    write_manifest(root, "prepare", {"source": "tests"})
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return _tiny_corpus(tmp_path_factory.mktemp("tok") / "prep")


@pytest.fixture(scope="module")
def bpe_dir(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return run_tokenizer_train(TokenizerTrainConfig(data=prepared, output=out, kind="bpe", vocab_size=420))


def _all_texts(prepared: Path) -> list[str]:
    return [d["text"] for p in sorted(prepared.rglob("*.jsonl.zst")) for d in read_pile_shard(p)]


def test_bpe_dir_layout_specials_and_report(bpe_dir, prepared):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "manifest.json"):
        assert (bpe_dir / name).is_file(), name
    m = read_manifest(bpe_dir)
    assert m["stage"] == "tokenizer" and m["extra"]["kind"] == "bpe"
    tok = load_tokenizer(bpe_dir)
    assert tok.kind == "bpe" and tok.vocab_size == 420 and tok.backend == "gigatoken"
    assert (tok.eod_id, tok.pad_id) == (0, 1)  # GPT-NeoX-20B: <|endoftext|> = 0, <|padding|> = 1
    assert tok.hf.id_to_token(0) == "<|endoftext|>" and tok.hf.id_to_token(1) == "<|padding|>"
    assert tok.mask_id is None and tok.cls_id is None
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    assert spec["normalizer"]["type"] == "NFC" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["add_prefix_space"] is False
    # Bytes per token per component, measured on val (it exists here), for every component.
    val_components = {d["meta"]["pile_set_name"] for d in read_pile_shard(prepared / "val" / "val.jsonl.zst")}
    bpt = m["extra"]["bytes_per_token"]
    assert m["extra"]["bytes_per_token_on"] == "val"
    assert set(bpt) == val_components | {"_overall"}
    assert all(1.0 <= v < 8.0 for v in bpt.values())
    # Trained on train only: it read exactly the train split's text.
    train_chars = sum(len(d["text"]) for p in sorted((prepared / "train").glob("*.zst")) for d in read_pile_shard(p))
    assert sum(c["seen_bytes"] for c in m["counts"]["components"].values()) == m["counts"]["read_bytes"]
    assert m["counts"]["read_bytes"] >= train_chars  # bytes >= characters; val text not included
    assert m["counts"]["read_bytes"] < train_chars * 1.2


@pytest.mark.parametrize("encoder", ["gigatoken", "fastokens", "tiktoken"])
def test_fast_path_ids_identical_to_tokenizers(bpe_dir, prepared, encoder):
    tok = load_tokenizer(bpe_dir, encoder=encoder)
    slow = load_tokenizer(bpe_dir, fast=False)
    assert tok.backend == encoder and slow.backend == "tokenizers"
    texts = _all_texts(prepared) + TRICKY + [t[::-1] for t in TRICKY]
    assert any(not unicodedata.is_normalized("NFC", t) for t in texts)
    expected = [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts] == expected
    ids, offsets = tok.encode_flat(texts)
    assert [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == expected
    assert slow.encode_batch(texts) == expected
    # A special-token string in a document is the special token, as tokenizers does.
    assert tok.eod_id in tok.encode("a<|endoftext|>b")
    # Decoding gives back the NFC text (byte-level BPE is lossless up to normalisation).
    for t in [t for t in texts[:50] + TRICKY if "<|" not in t]:
        assert tok.decode(tok.encode(t), skip_special_tokens=False) == unicodedata.normalize("NFC", t)


def test_transformers_loads_the_dir_identically(bpe_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = load_tokenizer(bpe_dir)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|padding|>"
    for t in TRICKY[:6]:
        assert hf(t, add_special_tokens=False)["input_ids"] == tok.encode(t)


@pytest.mark.parametrize("kind, specials", [
    ("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
    ("unigram", ["<pad>", "</s>", "<unk>", "<mask>"]),
])
def test_wordpiece_and_unigram(prepared, tmp_path, kind, specials):
    out = run_tokenizer_train(TokenizerTrainConfig(data=prepared, output=tmp_path / kind, kind=kind,
                                                   vocab_size=300, sample_bytes=60_000))
    tok = load_tokenizer(out)
    assert tok.kind == kind and tok.backend == "tokenizers"
    assert 250 <= tok.vocab_size <= 300
    assert [tok.hf.id_to_token(i) for i in range(len(specials))] == specials
    if kind == "wordpiece":
        assert (tok.pad_id, tok.cls_id, tok.eod_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 3, 4)
    else:
        assert (tok.pad_id, tok.eod_id, tok.mask_id, tok.unk_id) == (0, 1, 3, 2)
        assert tok.cls_id is None and tok.sep_id is None
    text = "The quick brown fox: 42 jumps."
    ids = tok.encode(text)
    assert ids and tok.eod_id not in ids and tok.cls_id not in ids  # documents get no specials
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")
    assert load_tokenizer(out / "tokenizer.json").encode(text) == ids
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert read_manifest(out)["extra"]["bytes_per_token"]["_overall"] > 1.0


def test_stratified_sample_is_bounded_and_keeps_small_components():
    s = StratifiedSample(budget=20_000, temperature=0.5, seed=1)
    doc = "x" * 100
    for i in range(5000):  # 500 kB of "Big", 15 kB of "Medium", 300 B of "Small", interleaved
        s.add(doc, "Big")
        if i % 10 == 0:
            s.add(doc[:30], "Medium")
        if i % 500 == 0:
            s.add(doc[:30], "Small")
    held = s.counts()
    assert (held["Big"]["seen_bytes"], held["Medium"]["seen_bytes"], held["Small"]["seen_bytes"]) == (
        500_000, 15_000, 300)
    assert sum(c["sample_bytes"] for c in held.values()) <= 20_000
    # Shares go as bytes**0.5; Small has less than its share, keeps it all, and the rest is
    # split between Big and Medium in proportion to sqrt(bytes) (within one document).
    assert held["Small"]["sample_bytes"] == 300
    medium_cap = (20_000 - 300) * 15_000**0.5 / (15_000**0.5 + 500_000**0.5)
    assert medium_cap - 30 <= held["Medium"]["sample_bytes"] <= medium_cap
    assert 20_000 - 300 - medium_cap - 100 <= held["Big"]["sample_bytes"] <= 20_000 - 300 - medium_cap
    # Uniform within a component: kept documents come from the whole stream, not its start.
    s2 = StratifiedSample(budget=5_000, seed=3)
    for i in range(2000):
        s2.add(f"{i:04d}" + "y" * 96, "A")
    kept = [int(t[:4]) for t in s2.texts()]
    assert len(kept) == 50 and kept == sorted(kept)
    assert min(kept) < 400 and max(kept) > 1600
    # Deterministic for a seed.
    s3 = StratifiedSample(budget=5_000, seed=3)
    for i in range(2000):
        s3.add(f"{i:04d}" + "y" * 96, "A")
    assert s3.texts() == s2.texts()
    # temperature 0: equal shares for components with enough data.
    s4 = StratifiedSample(budget=10_000, temperature=0.0)
    for i in range(1000):
        s4.add(doc, "A")
        if i % 4 == 0:
            s4.add(doc, "B")
    c = s4.counts()
    assert c["A"]["sample_bytes"] == c["B"]["sample_bytes"] == 5_000


def test_bounded_scan_reads_every_file(prepared, tmp_path):
    out = run_tokenizer_train(TokenizerTrainConfig(data=prepared, output=tmp_path / "t", vocab_size=300,
                                                   scan_bytes=40_000, sample_bytes=30_000))
    m = read_manifest(out)
    assert m["counts"]["read_bytes"] < 60_000
    assert m["counts"]["sample_bytes"] <= 30_000
    # Both train files contribute (each gets an equal share of the scan budget).
    assert len(m["counts"]["components"]) >= 3


def test_tiktoken_rank_file_and_conversion(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir, encoder="tiktoken")
    ranks = {bytes(k): v for k, v in tok.encoder.fast.encoding._mergeable_ranks.items()}
    # A rank file of a custom encoding (not one of OpenAI's names): GPT-2 regex, EOT after it.
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path = tmp_path / "custom.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    tt = load_tokenizer(path)
    # gigatoken loads a BPE whose vocabulary ids have gaps (here 0 and 1, the original's
    # specials, are not ranks) and is proven on it; fastokens 0.3.5 cannot (its reason kept).
    assert tt.kind == "bpe" and tt.backend == "gigatoken" and tt.passed_over == {}
    with pytest.raises(ValueError, match="fastokens cannot stand in.*cannot load"):
        load_tokenizer(path, encoder="fastokens")
    assert tt.eod_id == max(ranks.values()) + 1
    import tiktoken

    ref = tiktoken.Encoding("ref", pat_str=tok.encoder.fast.encoding._pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": tt.eod_id})
    texts = [unicodedata.normalize("NFC", t) for t in TRICKY if "<|" not in t] + ["hello world " * 5]
    for t in texts:
        assert tt.encode(t) == ref.encode_ordinary(t)
        # The converted tokenizers model (what gets saved as tokenizer.json) agrees too.
        assert tt.hf.encode(t, add_special_tokens=False).ids == ref.encode_ordinary(t)
    saved = load_tokenizer(tt.save(tmp_path / "saved"))
    assert saved.eod_id == tt.eod_id and all(saved.encode(t) == tt.encode(t) for t in texts)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGVsbG8= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_tokenizer(bad)


def test_rank_conversion_needs_consistent_merges():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    tok = tokenizer_from_ranks(ranks, r"\S+|\s+", {"<|endoftext|>": 258})
    assert tok.encode("abc abd").ids == [257, 32, 256, 100]
    with pytest.raises(ValueError, match="not the merge"):
        tokenizer_from_ranks({bytes([b]): b for b in range(256)} | {b"abc": 256}, r"\S+", {})


def test_foreign_tokenizers_fall_back_or_keep_fast(tmp_path, bpe_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # A byte-level BPE with a prefix space is not a shape the fast encoders are proven on.
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefix.json").write_text(json.dumps(spec))
    t = load_tokenizer(tmp_path / "prefix.json")
    assert t.backend == "tokenizers" and t.eod_id == 0 and set(t.passed_over) == {"gigatoken", "fastokens", "tiktoken"}
    assert t.encode("hi there") == Tokenizer.from_file(str(tmp_path / "prefix.json")).encode("hi there").ids
    # A tokenizer.json without side files (like a run's copy made by hand): roles by name.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    (tmp_path / "plain").mkdir()
    tok.save(str(tmp_path / "plain" / "tokenizer.json"))
    p = load_tokenizer(tmp_path / "plain")
    assert p.eod_id == 0 and p.pad_id is None and p.backend == "gigatoken"
    assert p.encode("hello world!") == tok.encode("hello world!").ids
    # An HF folder in the slow format (vocab.txt) is converted by transformers.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "bert" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    b = load_tokenizer(tmp_path / "bert")
    assert b.kind == "wordpiece" and b.encode("hello worlds!") == [5, 6, 7, 8]
    assert (b.eod_id, b.mask_id, b.cls_id) == (3, 4, 2)
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(tmp_path / "missing")


def test_config_validation_and_stage_checks(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(TokenizerTrainConfig, overrides=["vocab_size=100"])
    with pytest.raises(ConfigError, match="kind"):
        load_config(TokenizerTrainConfig, overrides=["kind=sentencepiece"])
    with pytest.raises(ConfigError, match="component_temperature"):
        load_config(TokenizerTrainConfig, overrides=["component_temperature=2"])
    with pytest.raises(ValueError, match="PREPARED_DIR"):
        run_tokenizer_train(TokenizerTrainConfig())
    (tmp_path / "raw").mkdir()
    with pytest.raises(StageInputError, match="pilelm prepare"):
        run_tokenizer_train(TokenizerTrainConfig(data=tmp_path / "raw", output=tmp_path / "o"))


def test_cli_tokenizer_train(prepared, tmp_path):
    from pilelm.core.cli import main

    out = tmp_path / "cli"
    assert main(["tokenizer", "train", str(prepared), "-o", str(out), "--kind", "bpe", "--vocab-size", "300",
                 "--sample-bytes", "50000"]) == 0
    tok = load_tokenizer(out)
    assert isinstance(tok, PileTokenizer) and tok.vocab_size == 300
    assert read_manifest(out)["config"]["sample_bytes"] == 50000
    assert Counter(tok.encode("the the the")).most_common(1)[0][1] >= 2
