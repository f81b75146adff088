"""Tokenizers: train (byte-level BPE, WordPiece, Unigram), load (ours, any tokenizer.json or
Hugging Face folder, tiktoken rank files) and encode fast.

Kinds, all built on Hugging Face ``tokenizers``:
- ``bpe``: GPT-NeoX-20B style (Black et al. 2022, its tokenizer.json): NFC, byte-level
  pre-tokenizer with GPT-2's split regex, no prefix space; ``<|endoftext|>`` = 0 (the EOD)
  and ``<|padding|>`` = 1, then the 256 byte symbols, then the merges in order.
- ``wordpiece``: BERT style (Devlin et al. 2019): BERT normalizer and pre-tokenizer, ``##``
  continuation, ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = 0..4; ``[SEP]`` ends documents.
- ``unigram``: SentencePiece style (Kudo 2018): NFKC, ``▁`` metaspace, ``<pad> </s> <unk>
  <mask>`` = 0..3; ``</s>`` ends documents.

Training reads a bounded, component-stratified sample (``StratifiedSample``): whatever the
corpus size, at most ``scan_bytes`` of text are read (spread evenly over the input files) and
at most ``sample_bytes`` are held; each component's share is proportional to its bytes raised
to ``component_temperature`` (0.5 flattens the mix the way XLM samples languages, Conneau &
Lample 2019 sec. 3.1), so small components are not drowned by large ones.

Encoding: for byte-level BPE, ``PileTokenizer`` builds a tiktoken ``Encoding`` from the same
ranks (token id = merge rank, the GPT-2 split regex, NFC applied in Python), several times
faster than ``tokenizers`` on this corpus and token-identical to it; the equivalence is
checked when the tokenizer loads (a mismatch falls back to ``tokenizers`` with a warning).
Texts holding special-token strings (``<|endoftext|>``) encode them as the special token, as
``tokenizers`` does.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import json
import logging
import random
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.core.manifest import Timer, require_stage, write_manifest

log = logging.getLogger(__name__)

# Special tokens per kind, in id order (ids 0..n-1). The names of the roles are what the rest
# of pilelm asks for (eod ends every document in the token shards; mask/cls/sep for BERT).
SPECIALS: dict[str, dict[str, str]] = {
    "bpe": {"eod": "<|endoftext|>", "pad": "<|padding|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "eod": "[SEP]", "mask": "[MASK]"},
    "unigram": {"pad": "<pad>", "eod": "</s>", "unk": "<unk>", "mask": "<mask>"},
}
# Role -> token strings to look for in tokenizers we did not train (first match wins).
_ROLE_CANDIDATES = {
    "eod": ("<|endoftext|>", "</s>", "[SEP]", "<|end_of_text|>", "<eos>", "<|eos|>"),
    "pad": ("<|padding|>", "[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
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


def _symbols_to_bytes(token: str) -> bytes | None:
    try:
        return bytes(CHAR_TO_BYTE[ch] for ch in token)
    except KeyError:
        return None


def _bytes_to_symbols(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# ---------------------------------------------------------------- the tokenizer


@dataclass
class _FastBPE:
    """tiktoken over the same ranks, plus what encoding needs around it."""

    encoding: Any  # tiktoken.Encoding
    nfc: bool
    special_re: re.Pattern[str] | None


class PileTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids pilelm needs and a fast encoder.

    ``encode`` never adds special tokens (documents are encoded as they are; ``pilelm
    tokenize`` appends one EOD per document).
    """

    def __init__(self, tokenizer: Tokenizer, kind: str, specials: dict[str, str] | None = None,
                 fast: bool = True, source: str = "", spec: dict[str, Any] | None = None):
        self.hf = tokenizer
        self.kind = kind
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        specials = dict(specials or {})
        for role, candidates in _ROLE_CANDIDATES.items():
            if role not in specials:
                found = next((c for c in candidates if c in vocab), None)
                if found is not None and not (role == "sep" and kind == "bpe"):
                    specials[role] = found
        if kind == "wordpiece":
            specials.setdefault("sep", specials.get("eod", "[SEP]"))
        self.specials = {role: tok for role, tok in specials.items() if tok in vocab}
        self._fast: _FastBPE | None = None
        if fast:
            self._fast = _fast_bpe(tokenizer, spec)

    # ids of the roles; None when the tokenizer has no such token
    def _id(self, role: str) -> int | None:
        tok = self.specials.get(role)
        return None if tok is None else self.hf.token_to_id(tok)

    @property
    def eod_id(self) -> int | None:
        return self._id("eod")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad")

    @property
    def mask_id(self) -> int | None:
        return self._id("mask")

    @property
    def cls_id(self) -> int | None:
        return self._id("cls")

    @property
    def sep_id(self) -> int | None:
        return self._id("sep")

    @property
    def unk_id(self) -> int | None:
        return self._id("unk")

    @property
    def backend(self) -> str:
        """``tiktoken`` when the fast byte-level BPE encoder is in use, else ``tokenizers``."""
        return "tiktoken" if self._fast is not None else "tokenizers"

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast_encode(text).tolist()
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [self._fast_encode(t).tolist() for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """Token ids of one text as a numpy array (uint32 from tiktoken, else int64)."""
        if self._fast is not None:
            return self._fast_encode(text)
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """``encode_to_numpy`` of each text; one ``tokenizers`` batch call on the slow path."""
        if self._fast is not None:
            return [self._fast_encode(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def _fast_encode(self, text: str) -> np.ndarray:
        fast = self._fast
        assert fast is not None
        enc = fast.encoding
        if not fast.nfc or unicodedata.is_normalized("NFC", text):
            return enc.encode_to_numpy(text, allowed_special="all")
        if fast.special_re is None or not fast.special_re.search(text):
            return enc.encode_to_numpy(unicodedata.normalize("NFC", text), allowed_special="all")
        # tokenizers cuts special tokens out of the raw text and normalizes the pieces between
        # them: NFC of the whole text could fuse a special's last character with what follows.
        parts: list[np.ndarray] = []
        pos = 0
        for m in fast.special_re.finditer(text):
            parts.append(enc.encode_to_numpy(unicodedata.normalize("NFC", text[pos : m.start()]),
                                             allowed_special=set()))
            parts.append(np.array([enc.encode_single_token(m.group())], dtype=np.uint32))
            pos = m.end()
        parts.append(enc.encode_to_numpy(unicodedata.normalize("NFC", text[pos:]), allowed_special=set()))
        return np.concatenate(parts).astype(np.uint32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json plus the side files ``transformers.AutoTokenizer`` reads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self.hf.to_str(pretty=True))
        roles = {"eod": "eos_token", "pad": "pad_token", "unk": "unk_token", "mask": "mask_token",
                 "cls": "cls_token", "sep": "sep_token"}
        special_map = {name: self.specials[role] for role, name in roles.items() if role in self.specials}
        if self.kind == "bpe" and "eod" in self.specials:
            special_map["bos_token"] = self.specials["eod"]  # GPT-NeoX-20B: bos = eos = <|endoftext|>
        config: dict[str, Any] = {
            "tokenizer_class": "BertTokenizerFast" if self.kind == "wordpiece" else "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            **special_map,
            "pilelm": {"kind": self.kind, "specials": self.specials},
        }
        if self.kind == "wordpiece":
            config["do_lower_case"] = _bert_lowercase(self.hf)
        atomic_write_json(d / "tokenizer_config.json", config)
        atomic_write_json(d / "special_tokens_map.json", special_map)
        return d


def _bert_lowercase(tok: Tokenizer) -> bool:
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    return bool(norm.get("lowercase", False))


# ---------------------------------------------------------------- the fast BPE path


def _tiktoken_split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer, or None if tiktoken cannot mirror it."""
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


def _fast_bpe(tok: Tokenizer, spec: dict[str, Any] | None = None) -> _FastBPE | None:
    """A tiktoken encoder equivalent to ``tok`` (``spec``: its parsed JSON, if at hand), or
    None when ``tok`` is not a byte-level BPE that tiktoken can express (then ``tokenizers``
    encodes)."""
    try:
        import tiktoken
    except ImportError:
        return None
    if spec is None:
        spec = json.loads(tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        return None
    norm = spec.get("normalizer")
    if norm and not (norm.get("type") == "NFC" or (norm.get("type") == "Sequence" and all(
            n.get("type") == "NFC" for n in norm.get("normalizers", [])))):
        return None
    pattern = _tiktoken_split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None
    added = spec.get("added_tokens", [])
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
        return None
    if any(a.get("normalized") and unicodedata.normalize("NFC", a["content"]) != a["content"] for a in added):
        return None
    special = {a["content"]: int(a["id"]) for a in added}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for symbols, i in vocab.items():
        if symbols in special:
            continue
        b = _symbols_to_bytes(symbols)
        if b is None:
            return None
        ranks[b] = int(i)
    if len(ranks) != len(set(ranks.values())) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; tokenizers the
    # pair earliest in the merge list. They agree when the merge results' ids rise with the
    # merge order and no token is the result of two merges.
    last = -1
    results = set()
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rid = vocab.get(a + b)
        if rid is None or rid <= last or (a + b) in results:
            return None
        results.add(a + b)
        last = rid
    enc = tiktoken.Encoding(name="pilelm", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    special_re = re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True))) if special else None
    fast = _FastBPE(enc, nfc=bool(norm), special_re=special_re)
    mismatch = _check_equivalence(tok, fast)
    if mismatch is not None:
        log.warning("tiktoken and tokenizers disagree on %r; encoding with tokenizers (slower)", mismatch)
        return None
    return fast


# Text covering what the fast path must get right: contractions, digits, punctuation runs,
# whitespace runs and trailing whitespace, tabs/newlines/form feeds, non-Latin scripts,
# combining marks that NFC composes, special-token strings, code.
_PROBE = [
    "Hello world! It's John's 3rd day; they'll've gone, we'd re-try.   Spaces   here \t\t\n\n\n",
    "def f(x):\n    return x**2  # comment\n\n\tif a != b: pass\r\n",
    "Ünïcödé: naïve café, Zürich, 東京都, Москва, عربى, हिन्दी, 한국어 😀👍🏽 ",
    "A\u030a e\u0301 n\u0303 (decomposed)  <|endoftext|>x<|endoftext|> <|padding|>\u0338",
    "1234567890 3.14159 -42 1e-9 0xFF ½ ² ٣ 𝟘\u00a0nbsp\u2003em\u3000ideo\x0cff\x0bvt\x1cfs\x85nel",
    "' 's 'S 'll 'LL ''' ,,, ... !!! ??? ---  ===\n \n  \n",
]


def _check_equivalence(tok: Tokenizer, fast: _FastBPE) -> str | None:
    probe = PileTokenizer.__new__(PileTokenizer)
    probe._fast = fast
    for text in _PROBE:
        for piece in (text, text.strip(), text[::-1]):
            if tok.encode(piece, add_special_tokens=False).ids != probe._fast_encode(piece).tolist():
                return piece
    return None


# ---------------------------------------------------------------- loading


def load_tokenizer(path: str | Path, fast: bool = True) -> PileTokenizer:
    """A tokenizer from a pilelm tokenizer dir, a ``tokenizer.json`` file, a Hugging Face
    tokenizer folder (tokenizer.json, or vocab.json + merges.txt, or vocab.txt), or a
    tiktoken rank file (``*.tiktoken``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; train one with "
                                "`pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR`")
    if path.is_file() and path.suffix == ".tiktoken":
        return _load_tiktoken_file(path, fast)
    config: dict[str, Any] = {}
    if path.is_dir():
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        rank_files = sorted(path.glob("*.tiktoken"))
        if (path / "tokenizer.json").is_file():
            tok, spec = _read_tokenizer_json(path / "tokenizer.json")
        elif rank_files:
            return _load_tiktoken_file(rank_files[0], fast)
        else:
            tok = _from_transformers(path)
            spec = json.loads(tok.to_str())
    else:
        tok, spec = _read_tokenizer_json(path)
    ours = config.get("pilelm", {})
    kind = ours.get("kind") or _kind_of(spec)
    specials = dict(ours.get("specials") or {})
    if not specials:
        names = {"eod": "eos_token", "pad": "pad_token", "unk": "unk_token", "mask": "mask_token",
                 "cls": "cls_token", "sep": "sep_token"}
        for role, key in names.items():
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                specials[role] = value
    return PileTokenizer(tok, kind, specials, fast=fast, source=str(path), spec=spec)


def _read_tokenizer_json(path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        return Tokenizer.from_str(text), json.loads(text)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from e


def _kind_of(spec: dict[str, Any]) -> str:
    model = spec.get("model", {}).get("type", "")
    return {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(model, model.lower() or "unknown")


def _from_transformers(path: Path) -> Tokenizer:
    """A slow-format HF folder (vocab.json + merges.txt, vocab.txt, sentencepiece model):
    let transformers convert it to a fast tokenizer."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many kinds here
        raise ValueError(f"{path}: no tokenizer.json and transformers could not load it ({e})") from e
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: transformers loaded a slow tokenizer only; convert it to tokenizer.json")
    return backend


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


def _load_tiktoken_file(path: Path, fast: bool) -> PileTokenizer:
    """A tiktoken encoding from its rank file. For OpenAI's named encodings (file stem
    r50k_base, p50k_base, cl100k_base, o200k_base ...) tiktoken's own table gives the split
    regex and special tokens; other files get GPT-2's regex and ``<|endoftext|>`` after the
    last rank."""
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
    specials = {"eod": "<|endoftext|>"} if "<|endoftext|>" in special else {}
    return PileTokenizer(tok, "bpe", specials, fast=fast, source=str(path))


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
    vocab = {_bytes_to_symbols(b): r for b, r in ranks.items()}
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
        merges.append((_bytes_to_symbols(parts[0]), _bytes_to_symbols(parts[1])))
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


# ---------------------------------------------------------------- building and training


def new_tokenizer(kind: str, lowercase: bool = False) -> Tokenizer:
    """An untrained tokenizer of ``kind`` with its normalizer, pre-tokenizer and decoder."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE(fuse_unk=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        raise ValueError(f"kind must be bpe, wordpiece or unigram, got {kind!r}")
    return tok


def _trainer(kind: str, vocab_size: int, min_frequency: int) -> Any:
    specials = list(SPECIALS[kind].values())
    if kind == "bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if kind == "wordpiece":
        return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                         special_tokens=specials, continuing_subword_prefix="##",
                                         show_progress=False)
    return trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                   max_piece_length=16, show_progress=False)


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = False, length: int | None = None) -> PileTokenizer:
    """Train a tokenizer of ``kind`` on ``texts`` (an in-memory sample)."""
    tok = new_tokenizer(kind, lowercase)
    tok.train_from_iterator(texts, _trainer(kind, vocab_size, min_frequency), length=length)
    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PileTokenizer(tok, kind, dict(SPECIALS[kind]))


@dataclass
class _Held:
    priority: float
    order: int
    text: str
    nbytes: int

    def __lt__(self, other: _Held) -> bool:  # max-heap on priority via heapq (a min-heap)
        return self.priority > other.priority


@dataclass
class StratifiedSample:
    """A bounded, component-stratified random sample of documents, in one streaming pass.

    Each document gets a random priority; each component keeps its lowest-priority documents
    up to its byte cap (a bottom-k sample, uniform within the component). Caps split
    ``budget`` bytes in proportion to ``seen_bytes ** temperature`` and are recomputed as the
    stream goes (water-filling: a component with less data than its share keeps all of it
    and the rest is shared out). Memory stays about ``budget`` whatever the stream length.
    """

    budget: int
    temperature: float = 0.5
    seed: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    seen_docs: Counter[str] = field(default_factory=Counter)
    held_bytes: Counter[str] = field(default_factory=Counter)
    _heaps: dict[str, list[_Held]] = field(default_factory=dict)
    _caps: dict[str, float] = field(default_factory=dict)
    _n: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, text: str, component: str, nbytes: int | None = None) -> None:
        nbytes = len(text.encode("utf-8")) if nbytes is None else nbytes
        priority = self._rng.random()
        self.seen[component] += nbytes
        self.seen_docs[component] += 1
        self._n += 1
        heap = self._heaps.setdefault(component, [])
        heapq.heappush(heap, _Held(priority, self._n, text, nbytes))
        self.held_bytes[component] += nbytes
        if self.held_bytes[component] > self._caps.get(component, 0.0):
            self._recompute_caps()  # the caps moved with the bytes seen; evicts what is over

    def _recompute_caps(self) -> None:
        weights = {c: float(b) ** self.temperature for c, b in self.seen.items() if b > 0}
        caps: dict[str, float] = {}
        left, active = float(self.budget), dict(weights)
        while active:
            total = sum(active.values())
            small = {c: self.seen[c] for c, w in active.items() if self.seen[c] <= left * w / total}
            if not small:
                caps.update({c: left * w / total for c, w in active.items()})
                break
            caps.update(small)
            left -= sum(small.values())
            for c in small:
                del active[c]
        self._caps = caps
        for c in list(self._heaps):
            self._evict(c)

    def _evict(self, component: str) -> None:
        heap, cap = self._heaps[component], self._caps.get(component, 0.0)
        while heap and self.held_bytes[component] > cap:
            item = heapq.heappop(heap)
            self.held_bytes[component] -= item.nbytes

    def texts(self) -> list[str]:
        """The sample in stream order."""
        self._recompute_caps()
        items = sorted((h for heap in self._heaps.values() for h in heap), key=lambda h: h.order)
        return [h.text for h in items]

    def by_component(self) -> dict[str, list[str]]:
        """Each component's sampled texts, lowest priority (i.e. a random order) first."""
        return {c: [h.text for h in sorted(heap, key=lambda h: h.priority)] for c, heap in self._heaps.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        return {c: {"seen_bytes": int(self.seen[c]), "seen_documents": int(self.seen_docs[c]),
                    "sample_bytes": int(self.held_bytes[c]), "sample_documents": len(self._heaps.get(c, []))}
                for c in sorted(self.seen)}


def bytes_per_token(tok: PileTokenizer, texts_by_component: dict[str, list[str]],
                    max_bytes: int) -> dict[str, float]:
    """UTF-8 bytes per token of each component on up to ``max_bytes`` of its texts, and
    ``_overall`` over all of them."""
    out: dict[str, float] = {}
    all_bytes = all_tokens = 0
    for comp in sorted(texts_by_component):
        nb = nt = 0
        for text in texts_by_component[comp]:
            if nb >= max_bytes:
                break
            nb += len(text.encode("utf-8"))
            nt += len(tok.encode(text))
        if nt:
            out[comp] = round(nb / nt, 4)
        all_bytes, all_tokens = all_bytes + nb, all_tokens + nt
    if all_tokens:
        out["_overall"] = round(all_bytes / all_tokens, 4)
    return out


# ---------------------------------------------------------------- the stage


@dataclass
class TokenizerTrainConfig:
    data: Path | None = None
    """Prepared directory (`pilelm prepare` output); the tokenizer trains on its train split."""
    output: Path | None = None
    """Output tokenizer directory (tokenizer.json, HF side files, manifest.json)."""
    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    """bpe: GPT-NeoX-style byte-level BPE; wordpiece: BERT; unigram: SentencePiece-style."""
    vocab_size: int = 32768
    """Vocabulary size including special tokens (<= 65535 keeps token shards uint16)."""
    min_frequency: int = 2
    """bpe/wordpiece: a pair must occur this often in the sample to be merged."""
    sample_bytes: int = 256_000_000
    """Most text (UTF-8 bytes) held in memory for training, whatever the corpus size."""
    scan_bytes: int = 2_000_000_000
    """Most text read to draw the sample, spread evenly over the train files; 0 reads all."""
    component_temperature: float = 0.5
    """Component shares of the sample are proportional to bytes**t: 1 = as in the corpus,
    0 = equal per component."""
    lowercase: bool = False
    """wordpiece: lowercase and strip accents (bert-base-uncased style)."""
    report_bytes: int = 2_000_000
    """Text per component used to report bytes per token (the val split when present)."""
    seed: int = 0
    """Seed of the sample."""

    def __post_init__(self) -> None:
        if self.kind not in SPECIALS:
            raise ValueError(f"kind must be bpe, wordpiece or unigram, got {self.kind!r}")
        floor = len(SPECIALS[self.kind]) + (256 if self.kind == "bpe" else 1)
        if self.vocab_size < floor:
            raise ValueError(f"vocab_size must be at least {floor} for kind={self.kind}, got {self.vocab_size}")
        if self.sample_bytes < 1:
            raise ValueError(f"sample_bytes must be positive, got {self.sample_bytes}")
        if self.scan_bytes < 0:
            raise ValueError(f"scan_bytes must be >= 0 (0 reads everything), got {self.scan_bytes}")
        if not 0.0 <= self.component_temperature <= 1.0:
            raise ValueError(f"component_temperature must be in [0, 1], got {self.component_temperature}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


def prepared_split_files(prep: Path, split: str) -> list[Path]:
    """A prepared dir's documents of one split, in canonical (name) order."""
    return sorted((prep / split).glob("*.jsonl.zst"))


def iter_split_texts(files: list[Path], budget: int = 0) -> Iterator[tuple[str, str]]:
    """(text, component) of the documents of ``files``; with a ``budget`` > 0 at most about
    ``budget`` bytes of text, an equal share from each file (so a bounded read still sees
    every file, whatever order the corpus is in)."""
    from pilelm.data.readers import Rejected, expand_inputs, iter_source

    per_file = budget // max(1, len(files)) if budget else 0
    for src in expand_inputs([str(f) for f in files]):
        taken = 0
        for item in iter_source(src):
            if isinstance(item, Rejected):
                log.warning("skipped %s: %s %s", item.source, item.reason, item.detail)
                continue
            yield item.text, item.component
            taken += len(item.text.encode("utf-8")) if per_file else 0
            if per_file and taken >= per_file:
                break


def run_tokenizer_train(cfg: TokenizerTrainConfig) -> Path:
    if cfg.data is None or cfg.output is None:
        raise ValueError("give the prepared data and an output dir: "
                         "pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR")
    prep, out = Path(cfg.data), Path(cfg.output)
    require_stage(prep, "prepare", what="data")
    files = prepared_split_files(prep, "train")
    if not files:
        raise FileNotFoundError(f"{prep}/train holds no *.jsonl.zst; the tokenizer trains on the train split")
    timer = Timer()
    sample = StratifiedSample(cfg.sample_bytes, cfg.component_temperature, cfg.seed)
    with timer("sample"), tqdm(desc="sample", unit="B", unit_scale=True, disable=None) as bar:
        for text, comp in iter_split_texts(files, cfg.scan_bytes):
            sample.add(text, comp)
            bar.update(len(text))
    texts = sample.texts()
    if not texts:
        raise ValueError(f"{prep}/train has no documents to train a tokenizer on")
    log.info("training a %s tokenizer (vocab %d) on %d documents, %.1f MB sampled from %.1f MB read",
             cfg.kind, cfg.vocab_size, len(texts), sum(sample.held_bytes.values()) / 1e6,
             sum(sample.seen.values()) / 1e6)
    with timer("train"):
        tok = train_tokenizer(texts, cfg.kind, cfg.vocab_size, cfg.min_frequency, cfg.lowercase, len(texts))
    del texts
    with timer("report"):
        val_files = prepared_split_files(prep, "val")
        if val_files:
            by_comp: dict[str, list[str]] = {}
            for text, comp in iter_split_texts(val_files, 0):
                by_comp.setdefault(comp, []).append(text)
            report_on = "val"
        else:
            by_comp, report_on = sample.by_component(), "train sample"
        bpt = bytes_per_token(tok, by_comp, cfg.report_bytes)
    for comp, v in bpt.items():
        log.info("bytes per token  %-24s %.3f", comp, v)
    if out.exists() and (out / "manifest.json").is_file():
        (out / "manifest.json").unlink()  # the dir is unfinished until the new manifest lands
    tok.save(out)
    counts = {
        "vocab_size": tok.vocab_size,
        "sample_documents": sum(len(h) for h in sample._heaps.values()),
        "sample_bytes": int(sum(sample.held_bytes.values())),
        "read_bytes": int(sum(sample.seen.values())),
        "components": sample.counts(),
    }
    extra = {"kind": tok.kind, "specials": tok.specials, "eod_id": tok.eod_id, "pad_id": tok.pad_id,
             "backend": tok.backend, "bytes_per_token": bpt, "bytes_per_token_on": report_on}
    write_manifest(out, "tokenizer", cfg, inputs=[prep], counts=counts, timings=timer.timings, extra=extra)
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy a tokenizer's files (tokenizer.json and HF side files) into ``dst``; a tokenizer
    that is not a pilelm dir is loaded and saved in the pilelm layout."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and (src / "tokenizer.json").is_file() and (src / "tokenizer_config.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
        return dst
    load_tokenizer(src).save(dst)
    return dst


__all__ = [
    "PileTokenizer",
    "StratifiedSample",
    "TokenizerTrainConfig",
    "load_tokenizer",
    "run_tokenizer_train",
    "train_tokenizer",
]
