"""Byte-level BPE through tiktoken, both ways.

- **Encoding fast**: for a byte-level BPE tokenizer, ``fast_bpe`` builds a tiktoken
  ``Encoding`` from the same ranks (token id = merge rank, the same split regex, NFC applied
  in Python), several times faster than ``tokenizers`` and token-identical to it; a
  tokenizer tiktoken cannot mirror raises ``EncoderUnavailable``. Texts holding
  special-token strings (``<|endoftext|>``) encode them as the special token, as
  ``tokenizers`` does. ``require_byte_level_bpe`` is the structural check the fast encoders
  share; which encoder is used, and the probe that proves it, is ``pilelm.tokens.encoders``.
- **Reading tiktoken's files**: ``load_tiktoken_file`` turns a ``*.tiktoken`` rank file into
  the equivalent ``tokenizers`` byte-level BPE (what transformers' tiktoken converter does).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

# GPT-2's pre-tokenizer split (Radford et al. 2019; the regex of tokenizers' ByteLevel
# pre-tokenizer and of tiktoken's r50k_base).
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ---------------------------------------------------------------- byte-level symbols


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 src/encoder.py):
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def symbols_to_bytes(token: str) -> bytes | None:
    try:
        return bytes(CHAR_TO_BYTE[ch] for ch in token)
    except KeyError:
        return None


def bytes_to_symbols(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# ---------------------------------------------------------------- the fast encoder


@dataclass
class FastBPE:
    """tiktoken over the same ranks, plus what encoding needs around it."""

    encoding: Any  # tiktoken.Encoding
    nfc: bool
    special_re: re.Pattern[str] | None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (uint32), as ``tokenizers`` gives them."""
        enc = self.encoding
        if not self.nfc or unicodedata.is_normalized("NFC", text):
            return enc.encode_to_numpy(text, allowed_special="all")
        if self.special_re is None or not self.special_re.search(text):
            return enc.encode_to_numpy(unicodedata.normalize("NFC", text), allowed_special="all")
        # tokenizers cuts special tokens out of the raw text and normalizes the pieces between
        # them: NFC of the whole text could fuse a special's last character with what follows.
        parts: list[np.ndarray] = []
        pos = 0
        for m in self.special_re.finditer(text):
            parts.append(enc.encode_to_numpy(unicodedata.normalize("NFC", text[pos : m.start()]),
                                             allowed_special=set()))
            parts.append(np.array([enc.encode_single_token(m.group())], dtype=np.uint32))
            pos = m.end()
        parts.append(enc.encode_to_numpy(unicodedata.normalize("NFC", text[pos:]), allowed_special=set()))
        return np.concatenate(parts).astype(np.uint32)


class EncoderUnavailable(Exception):
    """A fast encoder cannot stand in for ``tokenizers`` on this tokenizer; the message says why."""


def _tiktoken_split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer, or None if it is not one of the two
    shapes below (GPT-2's ByteLevel with its own regex; a regex Split then a plain ByteLevel,
    as tiktoken-converted and Llama-3-style tokenizers have)."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return GPT2_SPLIT
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("add_prefix_space") and not steps[1].get("use_regex", True)
                and str(steps[0].get("behavior", "")).lower() == "isolated" and not steps[0].get("invert")
                and "Regex" in steps[0].get("pattern", {})):
            return steps[0]["pattern"]["Regex"]
    return None


def require_byte_level_bpe(spec: dict[str, Any]) -> str:
    """Check that ``spec`` (a parsed tokenizer.json) is a byte-level BPE of the shape the fast
    encoders are proven on: plain BPE (no dropout, byte fallback or subword affixes), NFC or
    no normalizer, one of the two byte-level pre-tokenizers, added tokens matched as plain
    strings, no truncation or padding. Returns the split regex; raises
    ``EncoderUnavailable`` naming the first thing that does not fit."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise EncoderUnavailable(f"model is {model.get('type')}, not BPE")
    for key in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise EncoderUnavailable(f"BPE with {key}={model[key]!r}")
    norm = spec.get("normalizer")
    if norm and not (norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and all(
            n.get("type") == "NFC" for n in norm.get("normalizers", [])))):
        raise EncoderUnavailable(f"normalizer {norm.get('type')} (only NFC or none)")
    pattern = _tiktoken_split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        raise EncoderUnavailable("pre-tokenizer is not byte-level (ByteLevel, or Split + ByteLevel)")
    for a in spec.get("added_tokens") or []:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise EncoderUnavailable(f"added token {a['content']!r} has lstrip/rstrip/single_word")
        if a.get("normalized") and unicodedata.normalize("NFC", a["content"]) != a["content"]:
            raise EncoderUnavailable(f"added token {a['content']!r} changes under NFC")
    if spec.get("truncation") or spec.get("padding"):
        raise EncoderUnavailable("truncation or padding is set in tokenizer.json")
    return pattern


def fast_bpe(spec: dict[str, Any]) -> FastBPE:
    """A tiktoken encoder over the ranks of ``spec`` (a parsed byte-level BPE tokenizer.json);
    raises ``EncoderUnavailable`` when tiktoken cannot express it. Whether it really encodes
    as ``tokenizers`` does is checked by the caller (``pilelm.tokens.encoders``)."""
    try:
        import tiktoken
    except ImportError:
        raise EncoderUnavailable("tiktoken is not installed") from None
    pattern = require_byte_level_bpe(spec)
    model = spec["model"]
    if model.get("ignore_merges"):
        raise EncoderUnavailable("BPE with ignore_merges")
    added = spec.get("added_tokens") or []
    special = {a["content"]: int(a["id"]) for a in added}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for symbols, i in vocab.items():
        if symbols in special:
            continue
        b = symbols_to_bytes(symbols)
        if b is None:
            raise EncoderUnavailable(f"vocabulary entry {symbols!r} is not byte-level")
        ranks[b] = int(i)
    if len(ranks) != len(set(ranks.values())) or any(bytes([b]) not in ranks for b in range(256)):
        raise EncoderUnavailable("ranks are not one id per byte string covering all 256 bytes")
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; tokenizers the
    # pair earliest in the merge list. They agree when the merge results' ids rise with the
    # merge order and no token is the result of two merges.
    last = -1
    results = set()
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rid = vocab.get(a + b)
        if rid is None or rid <= last or (a + b) in results:
            raise EncoderUnavailable("merge result ids do not rise with the merge order")
        results.add(a + b)
        last = rid
    enc = tiktoken.Encoding(name="pilelm", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    special_re = re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True))) if special else None
    return FastBPE(enc, nfc=bool(spec.get("normalizer")), special_re=special_re)


# ---------------------------------------------------------------- tiktoken rank files


@contextlib.contextmanager
def _local_ranks(ranks: dict[bytes, int]) -> Iterator[None]:
    """Make tiktoken's table of known encodings use ``ranks`` instead of downloading them."""
    import tiktoken_ext.openai_public as public

    saved = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *a, **k: ranks  # type: ignore[assignment]
    try:
        yield
    finally:
        public.load_tiktoken_bpe = saved  # type: ignore[assignment]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file: one ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a `base64-token rank` line ({e})") from None
    if not ranks:
        raise ValueError(f"{path}: no ranks")
    return ranks


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """How BPE over ``ranks`` restricted to ranks below ``max_rank`` splits ``token``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def tokenizer_from_ranks(ranks: dict[bytes, int], pattern: str, special: dict[str, int]) -> Tokenizer:
    """A ``tokenizers`` byte-level BPE equivalent to a tiktoken encoding: each multi-byte
    token's merge is the pair BPE over the lower ranks leaves it as (what transformers'
    tiktoken converter does)."""
    vocab = {bytes_to_symbols(b): r for b, r in ranks.items()}
    taken = set(vocab.values())
    clash = [s for s, i in special.items() if i in taken]
    if clash:
        raise ValueError(f"special tokens {clash} reuse ids of ranked tokens")
    # Specials go into the model's vocabulary at their own ids (tokenizers would otherwise
    # number added tokens from len(vocab), which clashes when the ranks have gaps).
    vocab.update(special)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) is not the merge of two lower-ranked tokens")
        merges.append((bytes_to_symbols(parts[0]), bytes_to_symbols(parts[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(sorted(special, key=lambda s: special[s]))
    for s, i in special.items():
        if tok.token_to_id(s) != i:
            raise ValueError(f"special token {s!r} should have id {i}; the rank file has gaps "
                             "tokenizers cannot reproduce")
    return tok


def load_tiktoken_file(path: Path) -> tuple[Tokenizer, dict[str, str]]:
    """A tiktoken encoding from its rank file. For OpenAI's named encodings (file stem
    r50k_base, p50k_base, cl100k_base, o200k_base ...) tiktoken's own table gives the split
    regex and special tokens; other files get GPT-2's regex and ``<|endoftext|>`` after the
    last rank. Returns the ``tokenizers`` equivalent and its special-token roles."""
    ranks = read_tiktoken_ranks(path)
    name = path.stem
    pattern, special = GPT2_SPLIT, {"<|endoftext|>": max(ranks.values()) + 1}
    try:
        import tiktoken_ext.openai_public as public

        ctor = public.ENCODING_CONSTRUCTORS.get(name)
    except ImportError:
        ctor = None
    if ctor is not None:
        with _local_ranks(ranks):
            spec = ctor()
        pattern, special = spec["pat_str"], dict(spec["special_tokens"])
    else:
        log.warning("%s: not one of tiktoken's named encodings; assuming GPT-2's split regex and "
                    "<|endoftext|>=%d", path, special["<|endoftext|>"])
    tok = tokenizer_from_ranks(ranks, pattern, special)
    return tok, ({"eod": "<|endoftext|>"} if "<|endoftext|>" in special else {})
