"""The encoder choice (pilelm.tokens.encoders) and the overlapped tokenize pipeline: the
fastest encoder proven identical, fallbacks with reasons, invalid input, read-ahead, and
shards byte-identical whichever encoder wrote them."""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_pile_shard, write_pile_shard
from test_tokenizer import TRICKY

from pilelm.core.manifest import read_manifest, write_manifest
from pilelm.data.prepared import BadRecord, parse_record
from pilelm.tokens import encoders
from pilelm.tokens.encode import encode_lines, read_ahead, text_and_component
from pilelm.tokens.encoders import ENCODERS, Encoder, choose_encoder, first_difference
from pilelm.tokens.shards import open_split
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.tokens.tokenizer_train import TokenizerTrainConfig, run_tokenizer_train

SAMPLE = ROOT / "pilelm" / "sample"
# Input the encoders must agree on or refuse alike: NUL and control characters, a word of
# 200,000 characters, a whitespace run of 100,000, digits, a special token in a word.
ODD = ["a\x00b\x00\x00 c\x01\x1f", "x" * 200_000, " " * 100_000 + "end", "9" * 50_000,
       "pre<|endoftext|>post", "\ufeff\u200b\U0010fffd"]
SURROGATE = '{"text": "lone \\ud800 surrogate", "meta": {"pile_set_name": "Bad"}}'


@pytest.fixture(scope="module")
def sample_prep(tmp_path_factory) -> Path:
    """A prepared dir of the whole bundled sample: train 00-01, val; odd texts and one record
    with a lone surrogate in val."""
    root = tmp_path_factory.mktemp("enc") / "prep"
    for name in ("00", "01"):
        write_pile_shard(root / "train" / f"{name}.jsonl.zst", read_pile_shard(SAMPLE / "train" / f"{name}.jsonl.zst"))
    val = read_pile_shard(SAMPLE / "val.jsonl.zst") + [{"text": t, "meta": {"pile_set_name": "Odd"}} for t in ODD]
    path = write_pile_shard(root / "val" / "val.jsonl.zst", val)
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()
    lines = raw.split(b"\n")
    lines.insert(3, SURROGATE.encode())  # the 4th line: valid JSON, not valid Unicode
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines)))
    write_manifest(root, "prepare", {"source": "tests"})
    return root


@pytest.fixture(scope="module")
def bpe(sample_prep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "bpe"
    return run_tokenizer_train(TokenizerTrainConfig(data=sample_prep, output=out, vocab_size=500,
                                                    sample_bytes=400_000))


def _texts(prep: Path) -> list[str]:
    return [d["text"] for p in sorted(prep.rglob("*.jsonl.zst")) for d in read_pile_shard(p)
            if "\ud800" not in d["text"]]


def test_auto_is_gigatoken_and_every_encoder_gives_tokenizers_ids_on_the_sample(bpe):
    tok = load_tokenizer(bpe)
    assert tok.backend == "gigatoken" and tok.passed_over == {}
    texts = _texts(SAMPLE) + TRICKY + [t[::-1] for t in TRICKY]  # every document of the sample
    assert len(texts) > 1000 and any(not unicodedata.is_normalized("NFC", t) for t in texts)
    want = [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]
    for name in ("gigatoken", "fastokens", "tiktoken"):
        ids, offsets = load_tokenizer(bpe, encoder=name).encode_flat(texts)
        assert ids.dtype == np.uint32 and len(offsets) == len(texts) + 1
        got = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]
        assert [i for i in range(len(texts)) if got[i] != want[i]] == [], name


def test_wordpiece_and_unigram_keep_tokenizers_with_the_reasons(sample_prep, tmp_path):
    for kind, reason in (("wordpiece", "not BPE"), ("unigram", "not BPE")):
        out = run_tokenizer_train(TokenizerTrainConfig(data=sample_prep, output=tmp_path / kind, kind=kind,
                                                       vocab_size=300, sample_bytes=60_000))
        tok = load_tokenizer(out)
        assert tok.backend == "tokenizers"
        assert set(tok.passed_over) == {"gigatoken", "fastokens", "tiktoken"}
        assert reason in tok.passed_over["gigatoken"] and reason in tok.passed_over["fastokens"]
        for name in ("gigatoken", "fastokens"):
            with pytest.raises(ValueError, match="cannot stand in"):
                load_tokenizer(out, encoder=name)


class _OffByOne(Encoder):
    """A stand-in that is wrong on texts holding a digit: the probe must catch it."""

    name = "gigatoken"

    def __init__(self, good: Encoder):
        self.good = good

    def encode(self, text: str) -> np.ndarray:
        ids = self.good.encode(text)
        return ids + 1 if any(c.isdigit() for c in text) else ids


def test_a_stand_in_that_differs_on_the_probe_is_passed_over(bpe, monkeypatch, caplog):
    tok = load_tokenizer(bpe, fast=False)
    good = encoders._BUILDERS["gigatoken"]
    monkeypatch.setitem(encoders._BUILDERS, "gigatoken", lambda hf, spec: _OffByOne(good(hf, spec)))
    enc, passed = choose_encoder(tok.hf)
    assert enc.name == "fastokens" and "differently from tokenizers" in passed["gigatoken"]
    assert "gigatoken not used" in caplog.text
    with pytest.raises(ValueError, match="gigatoken cannot stand in"):
        choose_encoder(tok.hf, prefer="gigatoken")
    assert first_difference(tok.hf, good(tok.hf, json.loads(tok.hf.to_str()))) is None

    class Crashing(Encoder):
        name = "gigatoken"

        def encode(self, text: str) -> np.ndarray:
            raise RuntimeError("internal error")

    monkeypatch.setitem(encoders._BUILDERS, "gigatoken", lambda hf, spec: Crashing())
    enc, passed = choose_encoder(tok.hf)
    assert enc.name == "fastokens" and "failed on the probe (RuntimeError" in passed["gigatoken"]


def test_a_passed_probe_is_remembered_per_tokenizer_and_library(bpe, tmp_path, monkeypatch):
    """The second load of a tokenizer skips the probe; another tokenizer, another class or a
    failed probe is probed (again)."""
    monkeypatch.setenv(encoders.PROOF_CACHE_ENV, str(tmp_path / "cache"))
    calls: list[str] = []
    real = encoders.first_difference

    def counting(hf, enc):
        calls.append(type(enc).__name__)
        return real(hf, enc)

    monkeypatch.setattr(encoders, "first_difference", counting)
    assert load_tokenizer(bpe).backend == "gigatoken" and calls == ["GigatokenEncoder"]
    assert load_tokenizer(bpe).backend == "gigatoken" and calls == ["GigatokenEncoder"]  # remembered
    assert len(list((tmp_path / "cache" / "encoder-proofs").iterdir())) == 1
    # another tokenizer (one added token more) is a new key
    spec = json.loads((bpe / "tokenizer.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": len(spec["model"]["vocab"]) + 50,
                                 "content": "<|other|>"})
    (other / "tokenizer.json").write_text(json.dumps(spec))
    load_tokenizer(other / "tokenizer.json")
    assert calls == ["GigatokenEncoder", "GigatokenEncoder"]
    # a stand-in that fails is probed every time and never remembered
    good = encoders._BUILDERS["gigatoken"]
    monkeypatch.setitem(encoders._BUILDERS, "gigatoken", lambda hf, spec: _OffByOne(good(hf, spec)))
    for _ in range(2):
        assert load_tokenizer(bpe).backend == "fastokens"
    assert calls.count("_OffByOne") == 2


def test_invalid_and_extreme_input(bpe):
    """Lone surrogates are refused by every encoder (the document is skipped with a reason);
    NUL, huge words and whitespace runs encode exactly as tokenizers does."""
    ref = load_tokenizer(bpe, fast=False)
    for name in ENCODERS:
        tok = load_tokenizer(bpe, encoder=name)
        for text in ODD:
            assert tok.encode(text) == ref.hf.encode(text, add_special_tokens=False).ids, (name, text[:10])
        with pytest.raises((UnicodeEncodeError, TypeError)):
            tok.encode_flat(["fine", "lone \ud800 surrogate"])
        lines = b'{"text": "ok"}\n' + SURROGATE.encode() + b'\n{"text": "ok too"}\nnot json\n'
        enc = encode_lines(tok, lines, 10, "f.jsonl", tok.eod_id, np.dtype(np.uint16))
        assert enc.skipped == {"invalid_unicode": 1, "invalid_json": 1}
        assert enc.sizes.tolist() == [len(tok.encode("ok")) + 1, len(tok.encode("ok too")) + 1]
        assert enc.tokens.tolist() == tok.encode("ok") + [tok.eod_id] + tok.encode("ok too") + [tok.eod_id]
        assert enc.nbytes.tolist() == [2, 6]


def test_shards_are_byte_identical_whichever_encoder_and_workers(bpe, sample_prep, tmp_path):
    outs = {}
    for name, workers in (("tokenizers", 1), ("tiktoken", 2), ("fastokens", 1), ("fastokens", 2),
                          ("gigatoken", 1), ("gigatoken", 2)):
        out = run_tokenize(TokenizeConfig(data=sample_prep, tokenizer=bpe, output=tmp_path / f"{name}{workers}",
                                          workers=workers, encoder=name, batch_bytes=60_000))
        extra = read_manifest(out)["extra"]
        tokenizer = extra["tokenizer"]
        assert tokenizer["backend"] == tokenizer["encoder"]["name"] == name
        # gigatoken and fastokens encode in this process on their own threads; the others in
        # worker processes.
        assert extra["processes"] == (1 if name in ("gigatoken", "fastokens") else workers)
        assert tokenizer["encoder"]["version"] not in ("", "unknown")
        outs[name, workers] = out
    ref = outs["tokenizers", 1]
    counts = read_manifest(ref)["counts"]
    assert counts["splits"]["val"]["skipped"] == {"invalid_unicode": 1}
    for out in outs.values():
        for split in ("train", "val"):
            for ext in (".bin", ".idx", ".docmeta.npz", ".components.json"):
                assert (out / f"{split}{ext}").read_bytes() == (ref / f"{split}{ext}").read_bytes(), (out, ext)
        assert read_manifest(out)["counts"] == counts
    # auto records what it chose, and what it passed over (nothing, here)
    auto = read_manifest(run_tokenize(TokenizeConfig(data=sample_prep, tokenizer=bpe, output=tmp_path / "auto",
                                                     workers=1)))
    assert auto["extra"]["tokenizer"]["encoder"]["name"] == "gigatoken"
    assert auto["extra"]["tokenizer"]["encoder"]["passed_over"] == {}
    ts = open_split(tmp_path / "auto", "val")
    assert ts.component_names[ts.component[len(ts) - 1]] == "Odd"


def test_encoder_config_is_checked():
    with pytest.raises(ValueError, match="encoder"):
        TokenizeConfig(encoder="sentencepiece")


def test_read_ahead_keeps_order_raises_errors_and_stops_early():
    assert list(read_ahead(iter(range(100)), 3)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("corrupt near line 7")

    it = read_ahead(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="line 7"):
        next(it)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = read_ahead(endless(), 2)
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()  # the consumer stops: the thread ends, having read at most depth + 2 ahead
    assert not [t for t in threading.enumerate() if t.name == "pilelm-read-ahead"]
    assert len(produced) <= 5 + 2 + 2


def test_fast_json_reads_every_line_as_the_standard_parser_does():
    """orjson parses, json decides whatever orjson rejects or reads differently: the text and
    component (or the reason a line is skipped) equal parse_record's for every odd line."""
    lines = [b'{"text": "plain", "meta": {"pile_set_name": "Pile-CC"}}', b'{"text": "no meta"}',
             b'{"text": "meta not a dict", "meta": [1]}', b'{"meta": {"pile_set_name": "x"}}', b'[1, 2]',
             b'{"text": 3}', SURROGATE.encode(), b'{"text": "a\\udc00\\ud800b"}', b'{"text": "\xed\xa0\x80"}',
             b'{"text": "nan meta", "meta": {"v": NaN, "pile_set_name": "P"}}', b'\xef\xbb\xbf{"text": "bom"}',
             b'{"text": "big", "meta": {"pile_set_name": 123456789012345678901234567890}}',
             b'{"text": "int", "meta": {"pile_set_name": 7}}', b'{"text": "f", "meta": {"pile_set_name": 1e400}}',
             b'{"text": "dup", "text": "last"}', b'{"text": "\xff"}', b'not json', b'{"text": "x"} trailing',
             b'  {"text": "\\u0000 nul \\ud83d\\ude00"}\r', b'{"text": "' + "é東".encode() * 100 + b'"}']
    for raw in lines:
        try:
            text, meta = parse_record(raw)
            want: object = (text, str(meta.get("pile_set_name", "")))
        except BadRecord as e:
            want = e.reason
        try:
            got: object = text_and_component(raw)
        except BadRecord as e:
            got = e.reason
        assert got == want, raw
