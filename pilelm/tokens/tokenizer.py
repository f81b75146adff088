"""The tokenizer pilelm works with: ``PileTokenizer`` (a ``tokenizers.Tokenizer`` with the
special-token ids pilelm asks for and a fast encoder), ``load_tokenizer`` (ours, any
tokenizer.json or Hugging Face folder, tiktoken rank files) and ``copy_tokenizer``.

Encoding goes through the fastest library proven identical to ``tokenizers`` for the
tokenizer at hand (``pilelm.tokens.encoders``: gigatoken, fastokens, tiktoken, then tokenizers).
Training a tokenizer is ``pilelm.tokens.tokenizer_train``; its identity, ``pilelm.tokens.identity``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.tokens.chat import load_chat_template
from pilelm.tokens.encoders import Encoder, choose_encoder
from pilelm.tokens.fast_bpe import load_tiktoken_file

# Role -> token strings to look for in tokenizers we did not train (first match wins).
_ROLE_CANDIDATES = {
    "eod": ("<|endoftext|>", "</s>", "[SEP]", "<|end_of_text|>", "<eos>", "<|eos|>"),
    "pad": ("<|padding|>", "[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
# Role -> the key transformers' tokenizer_config.json / special_tokens_map.json names it by.
HF_SPECIAL_KEYS = {"eod": "eos_token", "pad": "pad_token", "unk": "unk_token", "mask": "mask_token",
                   "cls": "cls_token", "sep": "sep_token"}


class PileTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids pilelm needs and a fast encoder.

    ``encode`` never adds special tokens (documents are encoded as they are; ``pilelm
    tokenize`` appends one EOD per document). ``encoder``: ``auto`` (the fastest one proven
    identical, see ``pilelm.tokens.encoders``) or a name; ``fast=False`` means ``tokenizers``
    with no check (for callers that only read the vocabulary).
    """

    def __init__(self, tokenizer: Tokenizer, kind: str, specials: dict[str, str] | None = None,
                 fast: bool = True, source: str = "", spec: dict[str, Any] | None = None,
                 encoder: str = "auto", chat_template: str | None = None):
        self.hf = tokenizer
        self.chat_template = chat_template
        """The Jinja chat template (``pilelm.tokens.chat``) saved as ``chat_template`` in
        tokenizer_config.json; None for a base model's tokenizer."""
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
        self.encoder: Encoder
        self.encoder, self.passed_over = choose_encoder(tokenizer, spec, encoder if fast else "tokenizers")
        """The encoder in use, and why each faster one was not."""
        self._plain: tuple[Tokenizer, int] | None = None  # encode_plain's copy, and the vocabulary size it was made at

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
        """The name of the encoder in use: ``gigatoken``, ``fastokens``, ``tiktoken`` or ``tokenizers``."""
        return self.encoder.name

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text).tolist()

    @property
    def special_strings(self) -> list[str]:
        """The strings of the special added tokens (``<|endoftext|>``, role markers), longest first."""
        found = [a.content for a in self.hf.get_added_tokens_decoder().values() if a.special]
        return sorted(found, key=len, reverse=True)

    def encode_plain(self, text: str) -> list[int]:
        """The ids of ``text`` taken as text: a special token's string in it (``<|endoftext|>``
        typed by a user) encodes as the ordinary characters it is, never as the special id
        (transformers' ``split_special_tokens=True``). Text from a request is encoded so."""
        specials = self.special_strings
        if not any(s in text for s in specials):
            return self.encode(text)
        size = self.hf.get_vocab_size(with_added_tokens=True)  # a tokenizer that gained tokens needs a new copy
        if self._plain is None or self._plain[1] != size:
            plain = Tokenizer.from_str(self.hf.to_str())
            plain.encode_special_tokens = True  # special tokens are split like any other text
            self._plain = (plain, size)
        return self._plain[0].encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids, offsets = self.encoder.encode_flat(texts)
        flat = ids.tolist()
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """Token ids of one text as a uint32 array."""
        return self.encoder.encode(text)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids in one uint32 array and offsets (int64, len(texts) + 1): text i's
        ids are ``ids[offsets[i]:offsets[i + 1]]`` (one batch call in the encoder)."""
        return self.encoder.encode_flat(texts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens by transformers' names (``eos_token``, ``pad_token``, ...)."""
        special_map = {name: self.specials[role] for role, name in HF_SPECIAL_KEYS.items() if role in self.specials}
        if self.kind == "bpe" and "eod" in self.specials:
            special_map["bos_token"] = self.specials["eod"]  # GPT-NeoX-20B: bos = eos = <|endoftext|>
        return special_map

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json plus the side files ``transformers.AutoTokenizer`` reads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self.hf.to_str(pretty=True))
        special_map = self.special_tokens_map()
        config: dict[str, Any] = {
            "tokenizer_class": "BertTokenizerFast" if self.kind == "wordpiece" else "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            **special_map,
            "pilelm": {"kind": self.kind, "specials": self.specials},
        }
        if self.kind == "wordpiece":
            config["do_lower_case"] = _bert_lowercase(self.hf)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_json(d / "tokenizer_config.json", config)
        atomic_write_json(d / "special_tokens_map.json", special_map)
        return d


def _bert_lowercase(tok: Tokenizer) -> bool:
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    return bool(norm.get("lowercase", False))


# ---------------------------------------------------------------- loading


def load_tokenizer(path: str | Path, fast: bool = True, encoder: str = "auto") -> PileTokenizer:
    """A tokenizer from a pilelm tokenizer dir, a ``tokenizer.json`` file, a Hugging Face
    tokenizer folder (tokenizer.json, or vocab.json + merges.txt, or vocab.txt), or a
    tiktoken rank file (``*.tiktoken``). ``fast``/``encoder``: see ``PileTokenizer``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; train one with "
                                "`pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR`")
    if path.is_file() and path.suffix == ".tiktoken":
        return _from_tiktoken_file(path, fast, encoder)
    config: dict[str, Any] = {}
    if path.is_dir():
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        rank_files = sorted(path.glob("*.tiktoken"))
        if (path / "tokenizer.json").is_file():
            tok, spec = _read_tokenizer_json(path / "tokenizer.json")
        elif rank_files:
            return _from_tiktoken_file(rank_files[0], fast, encoder)
        else:
            tok = _from_transformers(path)
            spec = json.loads(tok.to_str())
    else:
        tok, spec = _read_tokenizer_json(path)
    ours = config.get("pilelm", {})
    kind = ours.get("kind") or _kind_of(spec)
    specials = dict(ours.get("specials") or {})
    if not specials:
        for role, key in HF_SPECIAL_KEYS.items():
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                specials[role] = value
    template = load_chat_template(path) if path.is_dir() else None
    return PileTokenizer(tok, kind, specials, fast=fast, source=str(path), spec=spec, encoder=encoder,
                         chat_template=template)


def _from_tiktoken_file(path: Path, fast: bool, encoder: str) -> PileTokenizer:
    tok, specials = load_tiktoken_file(path)
    return PileTokenizer(tok, "bpe", specials, fast=fast, source=str(path), encoder=encoder)


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


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy a tokenizer's files (tokenizer.json and HF side files) into ``dst``; a tokenizer
    that is not a pilelm dir is loaded and saved in the pilelm layout."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and (src / "tokenizer.json").is_file() and (src / "tokenizer_config.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
        return dst
    load_tokenizer(src).save(dst)
    return dst
