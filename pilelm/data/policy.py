"""Which quality rules apply to which Pile component by default, and the light rule.

The web-text rules (Gopher quality and repetition, Rae et al. 2021; C4's line rules, Raffel
et al. 2020) were written for raw Common Crawl pages. The Pile filtered only its Common Crawl
part (Gao et al. 2020, sec. 2.1 and appendix C: jusText extraction and a quality classifier
for Pile-CC); its other components are curated sources (papers, books, code, legal opinions,
Q&A, encyclopedia articles) whose normal text fails web rules: LaTeX repeats lines and holds
curly brackets, opinions and licences repeat clauses, tables and lists have few stop words.
Applied to every component they drop a large share of such documents (measured per component
on minipile in docs/prepare.md, "Data policy per Pile component").

So by default:
- **web rules** (``WEB_COMPONENTS``: Pile-CC, OpenWebText2): Gopher quality, Gopher repetition, C4;
- **the light rule** for every other component except code and generated maths: drop a
  document when more than half of its characters are covered by repeats of its own 10-grams
  (``light_max_dup_10gram_char_frac``): a file concatenated with itself, a log of one repeated
  line, a template stamped out many times. Real books, papers and opinions are far below it.
- length limits and the empty-document rule everywhere (``filters.min_chars``/``max_chars``).

Each group is a list of components in ``FilterConfig`` (``*`` = all) with a ``_skip`` list, so
``filters.gopher_quality=[*]`` restores the old everything-is-web policy.
"""

from __future__ import annotations

WEB_COMPONENTS = ["Pile-CC", "OpenWebText2"]
"""Raw web text: the components the web-text rules apply to by default."""

CODE_AND_MATHS = ["Github", "DM Mathematics"]
"""Components that are not prose at all: exempt from prose rules and from the light rule."""

LIGHT_RULE_REASON = "light_dup_10gram"
"""The drop reason of the light rule in manifests and stats.md."""


def light_repetition(dup_10gram_char_frac: float, limit: float) -> str | None:
    """The reason a curated document fails the light rule, or None. ``dup_10gram_char_frac`` is
    the character fraction covered by repeats of 10-grams (``filters.ngram_char_fractions``)."""
    return LIGHT_RULE_REASON if dup_10gram_char_frac > limit else None
