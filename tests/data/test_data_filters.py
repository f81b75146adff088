"""Normalisation and quality filters: each rule fires on what it targets, spares code and
maths by default, and the vectorised repetition statistics match a plain-Python reference."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from pilelm.data.document import Document
from pilelm.data.filters import (
    Cleaner,
    FilterConfig,
    c4_lines,
    gopher_quality,
    gopher_repetition,
    ngram_char_fractions,
    normalize_text,
    token_stats,
)
from pilelm.data.words import tokenize

PROSE = ("The history of the city is long, and the people that live there have seen many changes "
         "with the passing of time. It was founded by traders who came to the river to sell grain "
         "and cloth. Over the years the town grew into a busy port with markets, schools and a "
         "great library that is still open to this day for anyone who wishes to read. ")


def test_normalize() -> None:
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("cafe\u0301") == "caf\u00e9"
    assert normalize_text("x\x00y\x1bz\tq\x0cr\x85s") == "xyz\tq\x0crs"
    assert normalize_text("caf\u00e9\r\n", nfc=False, control=False) == "caf\u00e9\r\n"


def test_ftfy_repairs_mojibake() -> None:
    pytest.importorskip("ftfy")
    cleaner = Cleaner(FilterConfig(ftfy=True, gopher_quality=[], gopher_repetition=[], c4=[]))
    doc = Document("d", "The caf\u00c3\u00a9 is open.", {"pile_set_name": "X"})
    (out,) = cleaner([doc], lambda *a: None, lambda *a: None)
    assert out.text == "The caf\u00e9 is open."


def test_token_stats_match_str_split() -> None:
    texts = ["hello world 123 a1", "", "  \u00fcn\u00efcode  w\u00f6rds\t\tx", "...  ---", PROSE]
    stats = token_stats([t.encode() for t in texts])
    for t, row in zip(texts, stats, strict=True):
        ws = t.split()
        assert row.tolist() == [len(ws), sum(map(len, ws)), sum(any(c.isalpha() for c in w) for w in ws)]


@pytest.mark.parametrize(("text", "reason"), [
    (PROSE, None),
    ("the and of " * 5, "gopher_too_few_words"),
    ("# heading # " * 30 + PROSE, "gopher_symbol_ratio"),
    ("\n".join(f"- item {i} of the list with words" for i in range(40)), "gopher_bullet_lines"),
    ("\n".join(f"line {i} of the text that goes on and on with the words and then it trails off ..."
               for i in range(40)), "gopher_ellipsis_lines"),
    (" ".join(str(i * 1000003) for i in range(200)) + " " + PROSE, "gopher_non_alpha_words"),
    ("alpha beta gamma delta epsilon " * 20, "gopher_few_stop_words"),
    ("extraordinarily " * 100 + "the of", "gopher_long_words"),
])
def test_gopher_quality_rules(text: str, reason: str | None) -> None:
    assert gopher_quality(text, FilterConfig()) == reason


def _ref_fractions(text: str) -> tuple[list[float], list[float]]:
    """The repetition statistics computed word by word in plain Python."""
    words = [m.group() for m in re.finditer(r"[A-Za-z0-9\x80-\uffff]+", text)]
    lens = [len(w.encode()) for w in words]
    total = max(1, sum(lens))
    top = []
    for n in (2, 3, 4):
        grams = Counter(tuple(w.lower() for w in words[i: i + n]) for i in range(len(words) - n + 1))
        best = 0
        for i in range(len(words) - n + 1):
            g = tuple(w.lower() for w in words[i: i + n])
            if grams[g] > 1:
                best = max(best, grams[g] * sum(lens[i: i + n]))
        top.append(best / total)
    dup = []
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            g = tuple(w.lower() for w in words[i: i + n])
            if g in seen:
                covered[i: i + n] = [True] * n
            seen.add(g)
        dup.append(sum(ln for ln, c in zip(lens, covered, strict=True) if c) / total)
    return top, dup


def test_repetition_statistics_match_reference() -> None:
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts = []
    for _ in range(30):
        ws = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
        if ws and rng.random() < 0.7:  # plant repeated spans
            k = rng.randint(0, len(ws) - 1)
            ws += ws[k: k + rng.randint(3, 12)] * rng.randint(1, 3)
        texts.append(" ".join(ws))
    top, dup = ngram_char_fractions(tokenize([t.encode() for t in texts]))
    for i, t in enumerate(texts):
        rt, rd = _ref_fractions(t)
        np.testing.assert_allclose(top[i], rt, err_msg=t)
        np.testing.assert_allclose(dup[i], rd, err_msg=t)


def test_gopher_repetition_rules() -> None:
    cfg = FilterConfig()

    def check(text: str) -> str | None:
        top, dup = ngram_char_fractions(tokenize([text.encode()]))
        return gopher_repetition(text, top[0], dup[0], cfg)

    assert check(PROSE) is None
    assert check("\n".join(["same line here"] * 5 + ["other", "lines", "here"])) == "gopher_dup_lines"
    assert check(PROSE + " buy now " * 40) == "gopher_top_2gram"
    assert check(PROSE + PROSE) == "gopher_dup_5gram"


def test_c4_rules() -> None:
    cfg = FilterConfig()
    page = "\n".join([
        "Home | About | Contact",
        "Please enable JavaScript to view this page.",
        "The river runs through the old town and past the mill.",
        "Boats carry grain to the market every week in summer.[1]",
        "Children swim near the bridge when the water is warm.",
        "The mill was built in the year the town was founded.",
        "Visitors often ask where the best view of the valley is.",
    ])
    new, reason = c4_lines(page, cfg)
    assert reason == "" and new is not None
    assert "Home" not in new and "JavaScript" not in new and "[1]" not in new
    assert new.count("\n") == 4
    assert c4_lines(page + "\nLorem ipsum dolor sit amet.", cfg) == (None, "c4_lorem_ipsum")
    assert c4_lines(page + "\nint main() { return 0; }", cfg) == (None, "c4_curly_bracket")
    assert c4_lines("One sentence here only.", cfg) == (None, "c4_too_few_sentences")


def test_component_switching_spares_code_and_maths() -> None:
    code = "\n".join(["#include <stdio.h>", "int main(void) {", *["    x = f(x);"] * 30, "    return 0;", "}"])
    maths = "\n".join(f"Let x = {i}*y + {i + 1}. Solve for y.\n{i}" for i in range(20))
    drops: list[tuple[str, str]] = []

    def run(cfg: FilterConfig, comp: str, text: str) -> bool:
        doc = Document(comp, text, {"pile_set_name": comp})
        kept = Cleaner(cfg)([doc], lambda d, r, _: drops.append((d.component, r)), lambda *a: None)
        return bool(kept)

    assert run(FilterConfig(), "Github", code) and run(FilterConfig(), "DM Mathematics", maths)
    # the same text under a prose component is dropped, so the exemption is what saves it
    everything_is_web = FilterConfig(gopher_quality=["*"], gopher_repetition=["*"])
    assert not run(FilterConfig(), "Pile-CC", code) and not run(everything_is_web, "StackExchange", maths)
    assert not run(FilterConfig(gopher_quality=["*"], gopher_quality_skip=[]), "Github", code)
    assert [r[:7] for c, r in drops if c == "Github"] == ["gopher_"]


def test_length_and_empty() -> None:
    drops: list[str] = []
    cfg = FilterConfig(min_chars=5, max_chars=50, gopher_quality=[], gopher_repetition=[], c4=[])
    docs = [Document(str(i), t, {"pile_set_name": "X"}) for i, t in enumerate(["", "  \n", "abc", "fine text", "x" * 60])]
    kept = Cleaner(cfg)(docs, lambda d, r, _: drops.append(r), lambda *a: None)
    assert [d.text for d in kept] == ["fine text"]
    assert drops == ["empty", "empty", "too_short", "too_long"]


def test_language_filter() -> None:
    pytest.importorskip("py3langid")
    german = ("Die Geschichte der Stadt ist lang, und die Menschen, die dort leben, haben im Laufe der "
              "Zeit viele Veraenderungen gesehen. Sie wurde von Haendlern gegruendet.")
    cfg = FilterConfig(language=["en"], gopher_quality=[], gopher_repetition=[], c4=[])
    drops: list[str] = []
    docs = [Document("en", PROSE, {"pile_set_name": "X"}), Document("de", german, {"pile_set_name": "X"}),
            Document("code", german, {"pile_set_name": "Github"})]
    kept = Cleaner(cfg)(docs, lambda d, r, detail: drops.append(detail), lambda *a: None)
    assert [d.id for d in kept] == ["en", "code"]
    assert drops[0].startswith("de")
