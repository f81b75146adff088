"""``pilelm tokenizer train``: a byte-level BPE, WordPiece or Unigram tokenizer from a prepared dir.

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
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

from pilelm.core.manifest import MANIFEST, Timer, require_stage, write_manifest
from pilelm.data.prepared import iter_documents, split_files
from pilelm.tokens.identity import tokenizer_fingerprint
from pilelm.tokens.tokenizer import PileTokenizer

log = logging.getLogger(__name__)

# Special tokens per kind, in id order (ids 0..n-1). The names of the roles are what the rest
# of pilelm asks for (eod ends every document in the token shards; mask/cls/sep for BERT).
SPECIALS: dict[str, dict[str, str]] = {
    "bpe": {"eod": "<|endoftext|>", "pad": "<|padding|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "eod": "[SEP]", "mask": "[MASK]"},
    "unigram": {"pad": "<pad>", "eod": "</s>", "unk": "<unk>", "mask": "<mask>"},
}


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


def iter_split_texts(files: list[Path], budget: int = 0) -> Iterator[tuple[str, str]]:
    """(text, component) of the documents of prepared ``files``; with a ``budget`` > 0 at most
    about ``budget`` bytes of text, an equal share from each file (so a bounded read still
    sees every file, whatever order the corpus is in)."""
    per_file = budget // max(1, len(files)) if budget else 0
    for f in files:
        taken = 0
        for doc in iter_documents([f]):
            yield doc.text, doc.component
            taken += len(doc.text.encode("utf-8")) if per_file else 0
            if per_file and taken >= per_file:
                break


def run_tokenizer_train(cfg: TokenizerTrainConfig) -> Path:
    if cfg.data is None or cfg.output is None:
        raise ValueError("give the prepared data and an output dir: "
                         "pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR")
    prep, out = Path(cfg.data), Path(cfg.output)
    require_stage(prep, "prepare", what="data")
    files = split_files(prep, "train")
    if not files:
        raise FileNotFoundError(f"{prep} has no train split; the tokenizer trains on the train split")
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
        val_files = split_files(prep, "val")
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
    (out / MANIFEST).unlink(missing_ok=True)  # the dir is unfinished until the new manifest lands
    tok.save(out)
    counts = {
        "vocab_size": tok.vocab_size,
        "sample_documents": sum(len(h) for h in sample._heaps.values()),
        "sample_bytes": int(sum(sample.held_bytes.values())),
        "read_bytes": int(sum(sample.seen.values())),
        "components": sample.counts(),
    }
    extra = {"kind": tok.kind, "specials": tok.specials, "eod_id": tok.eod_id, "pad_id": tok.pad_id,
             "fingerprint": tokenizer_fingerprint(tok), "backend": tok.backend, "bytes_per_token": bpt,
             "bytes_per_token_on": report_on}
    write_manifest(out, "tokenizer", cfg, inputs=[prep], counts=counts, timings=timer.timings, extra=extra)
    return out
