"""Which library turns text into ids for a tokenizer: the fastest one proven identical to
``tokenizers`` for the tokenizer at hand.

``tokenizers`` defines what the ids are (it trained the tokenizer and is what Hugging Face
loads); it is also the slowest here. Three faster libraries can stand in for it on byte-level
BPE:

1. **gigatoken** (Rust, MIT, reads ``tokenizer.json`` itself): the fastest in memory on
   minipile (docs/tokenize.md, "Throughput"); its batch call returns one flat uint32 buffer and
   offsets (an awkward array), encoded on its own rayon thread pool.
2. **fastokens** (Rust, Apache-2.0): about 10x tiktoken per CPU-second; the batch call returns
   one flat uint32 buffer.
3. **tiktoken** over the same ranks (``pilelm.tokens.fast_bpe``), when the merges are in rank
   order.
4. **tokenizers** itself, always right.

``choose_encoder`` takes the first candidate that passes two checks at load time, for the
tokenizer at hand: its structure is one the candidate is known to mirror
(``fast_bpe.require_byte_level_bpe``: BPE kind, NFC or no normalizer, byte-level
pre-tokenizer, plain added tokens, no truncation), and it encodes the probe texts below
(special tokens in and around words, non-NFC text, whitespace runs, digits, scripts, NUL,
very long words) exactly as ``tokenizers`` does, one by one and as one batch. A candidate
that fails either check is passed over with the reason logged; the reasons and the chosen
encoder's name and version go into ``pilelm tokenize``'s manifest. A passed probe is
remembered (``proof_cache_dir``) under a key made of the tokenizer's whole ``tokenizer.json``,
the encoder's class and version and the probe itself, so the next load of the same tokenizer
with the same library skips it (about 0.1 CPU-second; a small corpus feels it); any change of
either is a new key and a new probe. A failed probe is never remembered.

Invalid input: a text with lone UTF-16 surrogates (valid JSON, not valid Unicode) raises
``UnicodeEncodeError`` from gigatoken, fastokens and tiktoken and ``TypeError`` from tokenizers; callers
(``pilelm.tokens.encode``) catch both and skip the document with a reason. NUL characters and
words of millions of characters encode identically in all three (fastokens in time linear in
the word, faster than tokenizers; tested); gigatoken splits a huge document at
pretoken-safe boundaries and reassembles identical ids.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pilelm.tokens.fast_bpe import EncoderUnavailable, FastBPE, fast_bpe, require_byte_level_bpe

log = logging.getLogger(__name__)

ENCODERS = ("gigatoken", "fastokens", "tiktoken", "tokenizers")
"""The encoders in the order ``auto`` tries them (fastest first)."""

# Threads the Rust encoders encode on in all, each read once per process at its first parallel
# encode (fastokens' own variable; gigatoken's rayon pool reads rayon's): pilelm tokenize sets
# them to its `workers`; a process of a pool with one per core sets 1.
FASTOKENS_THREADS_ENV = "FASTOKENS_BPE_THREADS"
RAYON_THREADS_ENV = "RAYON_NUM_THREADS"
THREAD_ENVS = (FASTOKENS_THREADS_ENV, RAYON_THREADS_ENV)
IN_PROCESS_ENCODERS = ("gigatoken", "fastokens")
"""Encoders whose batch call runs on their own threads outside the GIL: ``pilelm tokenize``
encodes with them in its own process, never in a pool of processes."""
_native_first_threads: str | None = None
"""The thread count at the first parallel encode of a Rust encoder in this process (None:
none yet)."""


def _note_native_threads(env: str) -> None:
    global _native_first_threads
    if _native_first_threads is None:  # what its thread pool is sized by, once per process
        _native_first_threads = os.environ.get(env, "default")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def flatten(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-text id arrays -> (all ids as uint32, offsets int64 of length len(parts) + 1)."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    ids = np.concatenate(parts).astype(np.uint32, copy=False) if parts else np.zeros(0, np.uint32)
    return ids, offsets


class Encoder:
    """Text -> ids without added special tokens, as ``tokenizers`` gives them."""

    name = ""

    @property
    def version(self) -> str:
        return _version(self.name)

    def encode(self, text: str) -> np.ndarray:
        """The ids of one text (uint32)."""
        raise NotImplementedError

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` concatenated (uint32) and offsets (int64, one more than
        texts): text i's ids are ``ids[offsets[i]:offsets[i + 1]]``."""
        return flatten([self.encode(t) for t in texts])


class TokenizersEncoder(Encoder):
    name = "tokenizers"

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return flatten([np.asarray(e.ids, dtype=np.uint32) for e in encs])


class TiktokenEncoder(Encoder):
    name = "tiktoken"

    def __init__(self, fast: FastBPE):
        self.fast = fast

    def encode(self, text: str) -> np.ndarray:
        return self.fast.encode(text)


class FastokensEncoder(Encoder):
    name = "fastokens"

    def __init__(self, tok: Any):  # fastokens.Tokenizer
        self.tok = tok

    def encode(self, text: str) -> np.ndarray:
        return self.encode_flat([text])[0]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        _note_native_threads(FASTOKENS_THREADS_ENV)
        ids, offsets = self.tok.encode_batch_flat(texts, add_special_tokens=False)
        return np.frombuffer(ids, dtype="<u4"), np.frombuffer(offsets, dtype="<u8").astype(np.int64)


class GigatokenEncoder(Encoder):
    name = "gigatoken"

    def __init__(self, tok: Any):  # gigatoken.Tokenizer
        self.tok = tok

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text), dtype=np.uint32)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parallel = os.environ.get(RAYON_THREADS_ENV) != "1"  # one thread: never start its pool
        if parallel:
            _note_native_threads(RAYON_THREADS_ENV)
        # An awkward array over one flat buffer plus offsets (a ListOffsetArray): read both
        # without a copy per text (``.layout``, not ``awkward.to_layout``: no dispatch).
        layout = self.tok.encode_batch(texts, parallel=parallel).layout
        ids = np.asarray(layout.content.data).astype(np.uint32, copy=False)
        offsets = np.asarray(layout.offsets.data).astype(np.int64, copy=False)
        if offsets[0]:  # a sliced view (not seen in practice): rebase to start at 0
            ids, offsets = ids[offsets[0]:offsets[-1]], offsets - offsets[0]
        return ids, offsets


# ---------------------------------------------------------------- candidates


def _rust_encoder(package: str, hf: Tokenizer, spec: dict[str, Any]) -> Encoder:
    """gigatoken or fastokens over this tokenizer's ``tokenizer.json`` (both read it themselves)."""
    require_byte_level_bpe(spec)
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise EncoderUnavailable(f"{package} is not installed") from None
    try:
        if package == "gigatoken":
            return GigatokenEncoder(module.Tokenizer.from_json(hf.to_str()))
        return FastokensEncoder(module.Tokenizer.from_json_str(hf.to_str()))
    except Exception as e:  # its loader raises its own errors for what it does not support
        raise EncoderUnavailable(f"{package} cannot load it ({e})") from None


def _tiktoken(hf: Tokenizer, spec: dict[str, Any]) -> Encoder:
    return TiktokenEncoder(fast_bpe(spec))


_BUILDERS = {"gigatoken": functools.partial(_rust_encoder, "gigatoken"),
             "fastokens": functools.partial(_rust_encoder, "fastokens"), "tiktoken": _tiktoken}

# Texts covering what a stand-in must get right: contractions, digits and digit runs,
# punctuation runs, whitespace runs and trailing whitespace, tabs/CR/LF/form feeds, scripts,
# emoji sequences, combining marks that NFC composes, special-token strings glued to words,
# NUL and other control characters, and words longer than any cache.
PROBE = [
    "Hello world! It's John's 3rd day; they'll've gone, we'd re-try.   Spaces   here \t\t\n\n\n",
    "def f(x):\n    return x**2  # comment\n\n\tif a != b: pass\r\n",
    "Ünïcödé: naïve café, Zürich, 東京都, Москва, عربى, हिन्दी, 한국어 😀👍🏽 ",
    "A\u030a e\u0301 n\u0303 (decomposed)  <|endoftext|>x<|endoftext|> <|padding|>\u0338",
    "1234567890 3.14159 -42 1e-9 0xFF ½ ² ٣ 𝟘\u00a0nbsp\u2003em\u3000ideo\x0cff\x0bvt\x1cfs\x85nel",
    "' 's 'S 'll 'LL ''' ,,, ... !!! ??? ---  ===\n \n  \n",
    "NUL\x00inside\x00\x00 text\x00 bell\x07 esc\x1b[0m del\x7f",
    "zwj 👨\u200d👩\u200d👧 flags 🇺🇳🇫🇷 \ufeffBOM \u200bzero-width \ue000private \U0010fffd",
    "000000000000 11111111111111111111 12345678901234567890123 ٠١٢٣٤٥٦٧٨٩",
    "CRLF\r\nline\r\n\r\n  \r\n\t \u2028sep\u2029para",
    "x" * 5000 + " " + "ab" * 2000 + " " + "é" * 1000,
    " " * 3000 + "tail\n" + "\n" * 500 + "\t" * 300 + "end" + " " * 200,
]


def _probe_texts(hf: Tokenizer) -> list[str]:
    """The probe, each text also stripped and reversed, plus one text with every added token
    (special or not) glued to words, doubled and alone on a line."""
    texts = [piece for text in PROBE for piece in (text, text.strip(), text[::-1])]
    added = [a.content for a in hf.get_added_tokens_decoder().values()]
    if added:
        texts.append(" ".join(f"a{c}b {c}{c}\n{c}" for c in added) + " end")
    return texts


PROOF_CACHE_ENV = "PILELM_CACHE_DIR"


def proof_cache_dir() -> Path:
    """Where passed probes are remembered: ``$PILELM_CACHE_DIR/encoder-proofs``, else
    ``$XDG_CACHE_HOME/pilelm/encoder-proofs``, else ``~/.cache/pilelm/encoder-proofs``."""
    root = os.environ.get(PROOF_CACHE_ENV)
    if root:
        return Path(root) / "encoder-proofs"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pilelm" / "encoder-proofs"


def _proof_key(hf_json: str, enc: Encoder) -> str:
    h = hashlib.sha256()
    cls = type(enc)
    for part in (hf_json, f"{cls.__module__}.{cls.__qualname__}", enc.name, enc.version, json.dumps(PROBE)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _proven_before(key: str) -> bool:
    return (proof_cache_dir() / key).is_file()


def _remember_proof(key: str) -> None:
    """Best effort: an unwritable cache only means the next load probes again."""
    folder = proof_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        os.replace(tmp, folder / key)
    except OSError as e:
        log.debug("encoder proof not remembered in %s: %s", folder, e)


def first_difference(hf: Tokenizer, enc: Encoder) -> str | None:
    """The first probe text ``enc`` encodes differently from ``hf`` in one batch call (all
    of them) or alone (the unvaried ones), or None."""
    texts = _probe_texts(hf)
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    ids, offsets = enc.encode_flat(texts)
    for i, text in enumerate(texts):
        if ids[offsets[i] : offsets[i + 1]].tolist() != want[i]:
            return text
    for text, ids_ in zip(texts[: 3 * len(PROBE) : 3], want[: 3 * len(PROBE) : 3], strict=True):
        if enc.encode(text).tolist() != ids_:
            return text
    return None


def choose_encoder(hf: Tokenizer, spec: dict[str, Any] | None = None, prefer: str = "auto"
                   ) -> tuple[Encoder, dict[str, str]]:
    """The encoder for ``hf`` (``spec``: its parsed tokenizer.json, if at hand) and why each
    faster candidate was passed over.

    ``prefer``: ``auto`` (the fastest candidate proven identical), or an encoder's name
    (that one; a ValueError saying why when it cannot be proven identical).
    """
    if prefer != "auto" and prefer not in ENCODERS:
        raise ValueError(f"encoder: {prefer!r} is not auto or one of {', '.join(ENCODERS)}")
    if prefer == "tokenizers":
        return TokenizersEncoder(hf), {}
    if spec is None:
        spec = json.loads(hf.to_str())
    passed_over: dict[str, str] = {}
    hf_json = hf.to_str()
    for name in [prefer] if prefer != "auto" else ENCODERS[:-1]:
        try:
            enc = _BUILDERS[name](hf, spec)
            key = _proof_key(hf_json, enc)
            if _proven_before(key):
                return enc, passed_over
            diff = first_difference(hf, enc)
            if diff is None:
                _remember_proof(key)
                return enc, passed_over
            passed_over[name] = f"encodes {diff[:60]!r} differently from tokenizers"
            log.warning("encoder %s not used for this tokenizer: it %s", name, passed_over[name])
        except (EncoderUnavailable, UnicodeError, ValueError) as e:
            passed_over[name] = str(e)
            log.info("encoder %s not used for this tokenizer: %s", name, passed_over[name])
        except BaseException as e:  # a Rust panic (pyo3's PanicException is a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            passed_over[name] = f"failed on the probe ({type(e).__name__}: {e})"
            log.warning("encoder %s not used for this tokenizer: it %s", name, passed_over[name])
    if prefer != "auto":
        raise ValueError(f"encoder: {prefer} cannot stand in for tokenizers on this tokenizer "
                         f"({passed_over[prefer]}); use encoder=auto")
    return TokenizersEncoder(hf), passed_over


def one_thread_per_process() -> None:
    """Keep the encoders' own thread pools to one thread in this process (call before the
    first encode; for processes that are one of a pool with one per core)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for env in THREAD_ENVS:
        os.environ[env] = "1"


@contextlib.contextmanager
def encoder_threads(threads: int) -> Iterator[None]:
    """Within: a Rust encoder's first parallel encode in this process starts ``threads``
    threads in all (each reads the number once per process; later calls change nothing)."""
    saved = {env: os.environ.get(env) for env in THREAD_ENVS}
    for env in THREAD_ENVS:
        os.environ[env] = str(max(1, threads))
    try:
        yield
    finally:
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def encoder_threads_started() -> bool:
    """Whether a Rust encoder has started threads of its own in this process (a fork beside
    them could copy a lock one holds: pools then start workers another way)."""
    return _native_first_threads not in (None, "1")
