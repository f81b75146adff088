"""Punctuation and casing labels taken from text itself, and the text rebuilt from them.

A text becomes words (split on whitespace); each word is stripped of the punctuation around
it and lowercased (the model's input), and labelled with the mark that followed it and whether
it was capitalised. The marks are the four classes of the punctuation-restoration literature
(Tilk & Alumäe 2016, "Bidirectional recurrent neural network with attention mechanism for
punctuation restoration"; Courtland et al. 2020): no mark, COMMA (also colon and dash),
PERIOD (also exclamation mark and semicolon) and QUESTION. A label is ``MARK+CASE``, e.g.
``PERIOD+Cap``: one token-classification head predicts both, so the exported model is a plain
``*ForTokenClassification``. Words with no letter or digit (a lone dash, a bullet) are dropped,
so a rebuilt text can lose them; a word is "Cap" when its first letter is upper case.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MARKS = ("O", "COMMA", "PERIOD", "QUESTION")
CASES = ("lower", "Cap")
LABELS = tuple(f"{m}+{c}" for m in MARKS for c in CASES)
MARK_TEXT = {"O": "", "COMMA": ",", "PERIOD": ".", "QUESTION": "?"}
# The trailing character -> its class (Tilk & Alumäe 2016, section 4.1).
_MARK_OF = {",": "COMMA", ":": "COMMA", "-": "COMMA", "\u2013": "COMMA", "\u2014": "COMMA",
            ".": "PERIOD", "!": "PERIOD", ";": "PERIOD", "\u2026": "PERIOD", "?": "QUESTION"}


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def strip_word(word: str) -> tuple[str, str]:
    """(core, trailing punctuation) of a whitespace-split word: ``"(Hello!)"`` -> ``("Hello", "!)")``."""
    start, end = 0, len(word)
    while start < end and _is_punct(word[start]):
        start += 1
    while end > start and _is_punct(word[end - 1]):
        end -= 1
    return word[start:end], word[end:]


@dataclass(frozen=True)
class LabelledWords:
    words: list[str]
    """Lowercased words without surrounding punctuation: what the model reads."""
    labels: list[str]
    """``MARK+CASE`` per word."""


def label_text(text: str) -> LabelledWords:
    words, labels = [], []
    for raw in text.split():
        core, trail = strip_word(raw)
        if not any(ch.isalnum() for ch in core):
            continue
        mark = next((_MARK_OF[ch] for ch in trail if ch in _MARK_OF), "O")
        first_letter = next((ch for ch in core if ch.isalpha()), "")
        case = "Cap" if first_letter.isupper() else "lower"
        words.append(core.lower())
        labels.append(f"{mark}+{case}")
    return LabelledWords(words, labels)


def plain_words(text: str) -> list[str]:
    """The model's input for a text to restore: its words lowercased and stripped."""
    return label_text(text).words


def restore(words: list[str], labels: list[str]) -> str:
    """Words and ``MARK+CASE`` labels -> text with the marks and capitals put back."""
    out = []
    for word, label in zip(words, labels, strict=True):
        mark, _, case = label.partition("+")
        if case == "Cap" and word:
            word = word[0].upper() + word[1:]
        out.append(word + MARK_TEXT[mark])
    return " ".join(out)


def split_label(label: str) -> tuple[str, str]:
    mark, _, case = label.partition("+")
    return mark, case
