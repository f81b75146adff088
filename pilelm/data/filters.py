"""Normalisation and quality filters; every dropped document is reported with its reason.

Rules, with their sources and default thresholds:

- **normalise**: CRLF/CR -> LF, Unicode NFC, C0/C1 control characters removed (tab, newline
  and form feed kept), optional ``ftfy`` mojibake repair.
- **length**: ``min_chars`` / ``max_chars``; an empty document is always dropped.
- **gopher_quality** (Rae et al. 2021, "Gopher", App. A.1.1): 50..100,000 words; mean word
  length 3..10; ``#`` and ellipsis per word <= 0.1; <= 90% of lines start with a bullet;
  <= 30% end with an ellipsis; >= 80% of words contain a letter; >= 2 of the stop words
  *the, be, to, of, and, that, have, with*. Words are whitespace-separated tokens.
- **gopher_repetition** (same paper, Table A1): duplicate lines <= 30% (by count) and
  <= 20% (by characters), likewise paragraphs; the most frequent 2/3/4-gram covers
  <= 20/18/16% of the characters; duplicated 5..10-grams cover <= 15..10%. Computed with
  numpy over a whole batch (words as in ``pilelm.data.words``).
- **c4** (Raffel et al. 2020, "T5", §2.2): keep only lines that end in terminal punctuation
  and have >= 3 words, remove lines mentioning javascript or cookie/privacy policies and
  citation markers; drop pages with "lorem ipsum", a curly bracket, or < 5 sentences left.
- **language** (optional, needs ``py3langid``): keep documents whose language is listed.

- **light** (``data/policy.py``): repeats of 10-grams cover <= 50 % of the characters.

Each rule group applies to the components listed in ``<group>`` (``*`` = all) minus those
in ``<group>_skip``. The default policy per Pile component is ``pilelm/data/policy.py``'s:
web rules (Gopher, C4) for raw web text (Pile-CC, OpenWebText2), the light rule for the
curated components, nothing but length limits for code and generated maths.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pilelm.data.document import Document
from pilelm.data.policy import CODE_AND_MATHS, WEB_COMPONENTS, light_repetition
from pilelm.data.words import Words, mix64, tokenize

DropFn = Callable[[Document, str, str], None]
"""``drop(doc, reason, detail)``: record a dropped document."""
EditFn = Callable[[Document, str, int], None]
"""``edited(doc, step, bytes_removed)``: record that a step changed a document."""

_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_STOP_WORDS = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
_BULLETS = "[\u2022\u2023\u25cf\u25aa\u25e6\u2043*-]"
_BULLET_LINE = re.compile(rf"\n[ \t]*{_BULLETS}")  # starts with a literal: fast scan
_BULLET_START = re.compile(rf"[ \t]*{_BULLETS}")
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|\u2026)[ \t]*(?:\n|$)")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"')\]]*)(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_END_PUNCT = (".", "!", "?", '"', "\u201d")

PROSE_SKIP = CODE_AND_MATHS


@dataclass
class FilterConfig:
    nfc: bool = True
    """Normalise text to Unicode NFC."""
    control_chars: bool = True
    """Turn CRLF and CR into LF and remove C0/C1 control characters (tab, newline, form feed kept)."""
    ftfy: bool = False
    """Repair mojibake with ftfy (needs `pip install ftfy`)."""
    min_chars: int = 0
    """Drop documents shorter than this many characters (empty ones are always dropped)."""
    max_chars: int | None = None
    """Drop documents longer than this many characters (None: no limit)."""

    gopher_quality: list[str] = field(default_factory=lambda: list(WEB_COMPONENTS))
    """Components the Gopher quality rules apply to (`*` = all, [] = off); default raw web text."""
    gopher_quality_skip: list[str] = field(default_factory=lambda: list(PROSE_SKIP))
    """Components exempt from the Gopher quality rules."""
    min_words: int = 50
    """Gopher: fewest whitespace-separated words."""
    max_words: int = 100_000
    """Gopher: most words."""
    min_mean_word_length: float = 3.0
    """Gopher: smallest mean word length (characters)."""
    max_mean_word_length: float = 10.0
    """Gopher: largest mean word length."""
    max_symbol_word_ratio: float = 0.1
    """Gopher: most `#` plus ellipses per word."""
    max_bullet_lines: float = 0.9
    """Gopher: largest fraction of lines starting with a bullet."""
    max_ellipsis_lines: float = 0.3
    """Gopher: largest fraction of lines ending with an ellipsis."""
    min_alpha_words: float = 0.8
    """Gopher: smallest fraction of words containing a letter."""
    min_stop_words: int = 2
    """Gopher: fewest English stop words (the, be, to, of, and, that, have, with)."""

    gopher_repetition: list[str] = field(default_factory=lambda: list(WEB_COMPONENTS))
    """Components the Gopher repetition rules apply to (`*` = all, [] = off); default raw web text."""
    gopher_repetition_skip: list[str] = field(default_factory=lambda: list(PROSE_SKIP))
    """Components exempt from the Gopher repetition rules."""
    max_dup_line_frac: float = 0.30
    """Gopher: largest fraction of lines that repeat an earlier line."""
    max_dup_para_frac: float = 0.30
    """Gopher: largest fraction of paragraphs that repeat an earlier one."""
    max_dup_line_char_frac: float = 0.20
    """Gopher: largest fraction of characters in repeated lines."""
    max_dup_para_char_frac: float = 0.20
    """Gopher: largest fraction of characters in repeated paragraphs."""
    max_top_ngram_char_frac: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """Gopher: largest character fraction of the most frequent 2-, 3-, 4-gram."""
    max_dup_ngram_char_frac: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """Gopher: largest character fraction covered by repeated 5-, 6-, ..., 10-grams."""

    c4: list[str] = field(default_factory=lambda: list(WEB_COMPONENTS))
    """Components the C4 line rules apply to (`*` = all, [] = off); default raw web text."""
    c4_skip: list[str] = field(default_factory=list)
    """Components exempt from the C4 rules."""
    c4_min_words_per_line: int = 3
    """C4: lines with fewer words are removed."""
    c4_min_sentences: int = 5
    """C4: pages with fewer sentences (after line removal) are dropped."""

    light: list[str] = field(default_factory=lambda: ["*"])
    """Components the light rule applies to (`*` = all, [] = off): drop a document mostly made
    of repeats of itself."""
    light_skip: list[str] = field(default_factory=lambda: list(PROSE_SKIP))
    """Components exempt from the light rule."""
    light_max_dup_10gram_char_frac: float = 0.5
    """Light rule: largest character fraction covered by repeated 10-grams."""

    language: list[str] = field(default_factory=list)
    """Keep only these languages (ISO 639-1 codes, e.g. [en]); [] = no language filter.
    Needs `pip install py3langid` (its model ships in the package; works offline)."""
    language_min_score: float = 0.65
    """Smallest probability of a listed language to keep a document."""
    language_skip: list[str] = field(default_factory=lambda: list(PROSE_SKIP))
    """Components exempt from language identification."""

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError("filters.min_chars must be >= 0")
        if self.max_chars is not None and self.max_chars <= self.min_chars:
            raise ValueError("filters.max_chars must be larger than filters.min_chars")
        if len(self.max_top_ngram_char_frac) != 3:
            raise ValueError("filters.max_top_ngram_char_frac needs 3 values (for 2-, 3-, 4-grams)")
        if len(self.max_dup_ngram_char_frac) != 6:
            raise ValueError("filters.max_dup_ngram_char_frac needs 6 values (for 5- to 10-grams)")
        if not 0 < self.light_max_dup_10gram_char_frac <= 1:
            raise ValueError("filters.light_max_dup_10gram_char_frac must be in (0, 1]")
        if not 0 <= self.language_min_score <= 1:
            raise ValueError("filters.language_min_score must be in [0, 1]")

    def applies(self, group: str, component: str) -> bool:
        comps: list[str] = getattr(self, group)
        return ("*" in comps or component in comps) and component not in getattr(self, f"{group}_skip")


# ---------------------------------------------------------------- normalisation


def normalize_text(text: str, nfc: bool = True, control: bool = True, fix: Callable[[str], str] | None = None) -> str:
    if control:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.isascii() or _CONTROL.search(text):
            text = _CONTROL.sub("", text)
    if fix is not None:
        text = fix(text)
    if nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


# ---------------------------------------------------------------- Gopher quality


_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_LETTER = np.zeros(256, dtype=bool)
_LETTER[65:91] = _LETTER[97:123] = True
_LETTER[0xC2:0xF5] = True  # lead byte of a non-ASCII character: counted as a letter


def token_stats(docs: list[bytes]) -> np.ndarray:
    """(D, 3) int64 per document: whitespace-separated tokens, their characters, and tokens
    containing a letter (a non-ASCII character counts as one); numpy over the whole batch."""
    out = np.zeros((len(docs), 3), dtype=np.int64)
    if not docs:
        return out
    buf = np.frombuffer(b"\n".join(docs) + b"\n", dtype=np.uint8)
    lens = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    doc_start = np.concatenate(([0], np.cumsum(lens)[:-1]))
    space = _SPACE[buf]
    tok_start = ~space
    tok_start[1:] &= space[:-1]
    out[:, 0] = np.add.reduceat(tok_start, doc_start, dtype=np.int64)
    out[:, 1] = np.add.reduceat(~space & ((buf & 0xC0) != 0x80), doc_start, dtype=np.int64)
    letters = np.flatnonzero(_LETTER[buf])
    if letters.size:
        tid = np.cumsum(tok_start)[letters]
        first = np.zeros(buf.size, dtype=bool)
        first[letters[np.concatenate(([True], tid[1:] != tid[:-1]))]] = True
        out[:, 2] = np.add.reduceat(first, doc_start, dtype=np.int64)
    return out


def gopher_quality(text: str, cfg: FilterConfig, stats: np.ndarray | None = None) -> str | None:
    """The reason the document fails the Gopher quality rules, or None. ``stats`` is the
    document's row of ``token_stats`` (computed here when not given)."""
    if stats is None:
        stats = token_stats([text.encode("utf-8")])[0]
    n, chars, alpha = (int(x) for x in stats)
    if n < cfg.min_words:
        return "gopher_too_few_words"
    if n > cfg.max_words:
        return "gopher_too_many_words"
    mean = chars / n
    if mean < cfg.min_mean_word_length:
        return "gopher_short_words"
    if mean > cfg.max_mean_word_length:
        return "gopher_long_words"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    n_lines = text.count("\n") + 1
    bullets = len(_BULLET_LINE.findall(text)) + bool(_BULLET_START.match(text))
    if bullets / n_lines > cfg.max_bullet_lines:
        return "gopher_bullet_lines"
    if len(_ELLIPSIS_LINE.findall(text)) / n_lines > cfg.max_ellipsis_lines:
        return "gopher_ellipsis_lines"
    if alpha / n < cfg.min_alpha_words:
        return "gopher_non_alpha_words"
    if cfg.min_stop_words > 0:
        found = 0
        for _ in _STOP_WORDS.finditer(text):
            found += 1
            if found >= cfg.min_stop_words:
                break
        else:
            return "gopher_few_stop_words"
    return None


# ---------------------------------------------------------------- Gopher repetition


def _dup_fraction(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in them)."""
    parts = [p for p in parts if p.strip()]
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for p in parts:
        total += len(p)
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / len(parts), dup_chars / max(1, total)


def ngram_char_fractions(words: Words) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (D, 3) character fraction of the most frequent 2/3/4-gram (counting
    only n-grams that occur more than once) and (D, 6) character fraction covered by
    repeats of 5..10-grams (occurrences after the first). Characters are word bytes.

    One sort per n over packed ``(hash, position)`` keys; an (n+1)-gram can only repeat
    where its n-gram prefix repeats, so each n after 2 sorts only those positions: for
    ordinary text a few percent of the words.
    """
    n_docs = len(words.bounds) - 1
    top = np.zeros((n_docs, 3))
    dup = np.zeros((n_docs, 6))
    h = words.hashes
    w = h.size
    if w < 2:
        return top, dup
    wl = (words.ends - words.starts).astype(np.int64)
    counts = np.diff(words.bounds)
    doc_of_word = np.repeat(np.arange(n_docs), counts)
    doc_end = words.bounds[1:][doc_of_word]
    denom = np.maximum(np.bincount(doc_of_word, weights=wl, minlength=n_docs), 1)
    cw = np.concatenate(([0], np.cumsum(wl)))
    pos_bits = int(w).bit_length()
    pos_mask = np.uint64((1 << pos_bits) - 1)
    cand = np.arange(w, dtype=np.int64)
    with np.errstate(over="ignore"):
        acc = h ^ mix64(doc_of_word.astype(np.uint64) + np.uint64(1))
        acc_at = np.empty(w, dtype=np.uint64)
        for n in range(2, 11):
            ok = cand + n <= doc_end[cand]
            cand, acc = cand[ok], acc[ok]
            if cand.size < 2:
                break
            acc = acc * np.uint64(0x9E3779B97F4A7C15) + h[cand + n - 1]
            key = np.sort((mix64(acc) & ~pos_mask) | cand.astype(np.uint64))
            hk = key & ~pos_mask
            pos = (key & pos_mask).astype(np.int64)
            new = np.concatenate(([True], hk[1:] != hk[:-1]))
            run = np.cumsum(new) - 1
            run_len = np.bincount(run)
            repeated = run_len[run] > 1
            if n <= 4:
                firsts = pos[new & repeated]
                if firsts.size:
                    chars = (cw[firsts + n] - cw[firsts]) * run_len[run[new & repeated]]
                    best = np.zeros(n_docs)
                    np.maximum.at(best, doc_of_word[firsts], chars)
                    top[:, n - 2] = best / denom
            else:
                later = pos[~new]
                if later.size:
                    delta = np.zeros(w + 1, dtype=np.int64)
                    np.add.at(delta, later, 1)
                    np.add.at(delta, later + n, -1)
                    covered = np.cumsum(delta[:-1]) > 0
                    dup[:, n - 5] = np.bincount(doc_of_word[covered], weights=wl[covered], minlength=n_docs) / denom
            acc_at[cand] = acc
            cand = np.sort(pos[repeated])
            acc = acc_at[cand]
    return top, dup


def gopher_repetition(text: str, top: np.ndarray, dup: np.ndarray, cfg: FilterConfig) -> str | None:
    lines = text.split("\n")
    frac, chars = _dup_fraction(lines)
    if frac > cfg.max_dup_line_frac:
        return "gopher_dup_lines"
    if chars > cfg.max_dup_line_char_frac:
        return "gopher_dup_line_chars"
    frac, chars = _dup_fraction(re.split(r"\n{2,}", text))
    if frac > cfg.max_dup_para_frac:
        return "gopher_dup_paragraphs"
    if chars > cfg.max_dup_para_char_frac:
        return "gopher_dup_paragraph_chars"
    for i, limit in enumerate(cfg.max_top_ngram_char_frac):
        if top[i] > limit:
            return f"gopher_top_{i + 2}gram"
    for i, limit in enumerate(cfg.max_dup_ngram_char_frac):
        if dup[i] > limit:
            return f"gopher_dup_{i + 5}gram"
    return None


# ---------------------------------------------------------------- C4


def c4_lines(text: str, cfg: FilterConfig) -> tuple[str | None, str]:
    """(new text, "") or (None, reason): keep C4's good lines, or drop the page."""
    lower = text.lower()
    if "lorem ipsum" in lower:
        return None, "c4_lorem_ipsum"
    if "{" in text:
        return None, "c4_curly_bracket"
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        if "[" in line:
            line = _CITATION.sub("", line)
        if not line.endswith(_END_PUNCT) or line.endswith("..."):
            continue
        if len(line.split()) < cfg.c4_min_words_per_line:
            continue
        low = line.lower()
        if "javascript" in low or any(p in low for p in _POLICY):
            continue
        kept.append(line)
    out = "\n".join(kept)
    if len(_SENTENCE_END.findall(out)) < cfg.c4_min_sentences:
        return None, "c4_too_few_sentences"
    return out, ""


# ---------------------------------------------------------------- the cleaner


class Cleaner:
    """Normalises and filters batches of documents according to a FilterConfig."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._fix = None
        if cfg.ftfy:
            try:
                import ftfy
            except ImportError as e:
                raise ValueError("filters.ftfy=true needs `pip install ftfy`") from e
            self._fix = ftfy.fix_text
        self._langid = None
        if cfg.language:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError as e:
                raise ValueError("filters.language needs `pip install py3langid`") from e
            self._langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def language_of(self, text: str) -> tuple[str, float]:
        assert self._langid is not None
        lang, prob = self._langid.classify(text[:20000])
        return str(lang), float(prob)

    def __call__(self, docs: list[Document], drop: DropFn, edited: EditFn) -> list[Document]:
        cfg = self.cfg
        kept: list[Document] = []
        for doc in docs:
            text = normalize_text(doc.text, cfg.nfc, cfg.control_chars, self._fix)
            if text is not doc.text and text != doc.text:
                edited(doc, "normalize", len(doc.text.encode()) - len(text.encode()))
                doc.text = text
            n = len(text)
            if n == 0 or not text.strip():
                drop(doc, "empty", "")
            elif n < cfg.min_chars:
                drop(doc, "too_short", f"{n} chars < filters.min_chars={cfg.min_chars}")
            elif cfg.max_chars is not None and n > cfg.max_chars:
                drop(doc, "too_long", f"{n} chars > filters.max_chars={cfg.max_chars}")
            else:
                kept.append(doc)
        quality = [d for d in kept if cfg.applies("gopher_quality", d.component)]
        if quality:
            stats = token_stats([d.text.encode() for d in quality])
            failed = {}
            for d, row in zip(quality, stats, strict=True):
                if r := gopher_quality(d.text, cfg, row):
                    failed[id(d)] = r
            if failed:
                survivors = []
                for d in kept:
                    if id(d) in failed:
                        drop(d, failed[id(d)], "")
                    else:
                        survivors.append(d)
                kept = survivors
        rep = [d for d in kept if cfg.applies("gopher_repetition", d.component) or cfg.applies("light", d.component)]
        if rep:
            top, dup = ngram_char_fractions(tokenize([d.text.encode() for d in rep]))
            bad = {}
            for i, d in enumerate(rep):
                r = None
                if cfg.applies("gopher_repetition", d.component):
                    r = gopher_repetition(d.text, top[i], dup[i], cfg)
                if r is None and cfg.applies("light", d.component):
                    r = light_repetition(float(dup[i, 5]), cfg.light_max_dup_10gram_char_frac)
                if r:
                    bad[id(d)] = r
            if bad:
                survivors = []
                for d in kept:
                    if id(d) in bad:
                        drop(d, bad[id(d)], "")
                    else:
                        survivors.append(d)
                kept = survivors
        out = []
        for doc in kept:
            if cfg.applies("c4", doc.component):
                new, reason = c4_lines(doc.text, cfg)
                if new is None:
                    drop(doc, reason, "")
                    continue
                if new != doc.text:
                    edited(doc, "c4_lines", len(doc.text.encode()) - len(new.encode()))
                    doc.note_change("c4_lines_removed", doc.text.count("\n") - new.count("\n"))
                    doc.text = new
            if self._langid is not None and doc.component not in cfg.language_skip:
                lang, prob = self.language_of(doc.text)
                if lang not in cfg.language or prob < cfg.language_min_score:
                    drop(doc, "language", f"{lang} p={prob:.2f}")
                    continue
            out.append(doc)
        return out
