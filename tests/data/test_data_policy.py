"""The default filter policy per Pile component: web rules for raw web text, the light rule
for curated sources, length limits only for code and maths; stats.md says what each rule
removed per component."""

from __future__ import annotations

from pathlib import Path

from pilelm.data.document import Document
from pilelm.data.filters import Cleaner, FilterConfig
from pilelm.data.policy import LIGHT_RULE_REASON, WEB_COMPONENTS
from pilelm.data.stats import TaskStats, write_report

LATEX = "\n".join([
    "\\documentclass{article}", "\\usepackage{amsmath}", "\\begin{document}",
    "\\section{Introduction}",
    "We study the heat equation $u_t = \\Delta u$ on a bounded domain $\\Omega$ with smooth boundary.",
    *[f"\\begin{{itemize}}\n\\item Case {i}: $\\|u_{i}\\|_{{L^2}} \\le C_{i}$\n\\end{{itemize}}" for i in range(12)],
    "\\end{document}",
])
LEGAL = "\n".join([  # an opinion's clauses: repetitive phrasing, but not copies
    "1. The licensee shall not be liable for damages arising from use of the software.",
    "2. Notwithstanding section 1, the licensor retains all rights not expressly granted herein.",
    "3. Any dispute shall be governed by the laws of the State of New York, without regard to conflicts.",
    "4. The appellant contends that the district court erred in granting summary judgment; we disagree.",
    "5. Reviewing de novo, we hold that the contract unambiguously excludes consequential damages.",
    "6. Affirmed in part, reversed in part, and remanded for proceedings consistent with this opinion.",
] * 2)
CODE = "\n".join(["def f(x):", *["    x = g(x)  # step"] * 40, "    return x"])
MATHS = "\n".join(f"Let x = {i}*y + {i + 1}. Solve for y.\n{i}" for i in range(30))
DEGENERATE = "\n\n".join(["The same paragraph of an otherwise fine book, copied over and over by a broken converter."] * 10)
WEB_BOILERPLATE = "\n".join(["Home | About | Contact", "Accept cookies", "This site uses cookies. Privacy policy.",
                             "Buy now!", "Sign in", "Share on Facebook"] * 3)


def run(cfg: FilterConfig, docs: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    drops: list[tuple[str, str]] = []
    documents = [Document(f"{c}#{i}", text, {"pile_set_name": c}) for i, (c, text) in enumerate(docs)]
    kept = Cleaner(cfg)(documents, lambda d, r, _: drops.append((d.component, r)), lambda *a: None)
    return [d.component for d in kept], drops


def test_curated_sources_keep_their_normal_text_that_web_rules_drop():
    curated = [("ArXiv", LATEX), ("FreeLaw", LEGAL), ("Github", CODE), ("DM Mathematics", MATHS)]
    kept, drops = run(FilterConfig(), curated)
    assert kept == ["ArXiv", "FreeLaw", "Github", "DM Mathematics"] and drops == []
    # The same texts as web pages meet the web rules (so the policy, not the text, keeps them).
    as_web = [("Pile-CC", LATEX), ("OpenWebText2", LEGAL)]
    kept, drops = run(FilterConfig(), as_web)
    assert kept == [] and {c for c, _ in drops} == set(WEB_COMPONENTS)
    assert all(r.startswith(("gopher_", "c4_")) for _, r in drops)
    # The old everything-is-web policy is one setting away.
    everything = FilterConfig(gopher_quality=["*"], gopher_repetition=["*"], c4=["*"])
    kept, _ = run(everything, curated)
    assert "ArXiv" not in kept and "FreeLaw" not in kept


def test_raw_web_text_gets_the_web_rules():
    kept, drops = run(FilterConfig(), [("Pile-CC", WEB_BOILERPLATE), ("OpenWebText2", WEB_BOILERPLATE)])
    assert kept == [] and len(drops) == 2


def test_the_light_rule_drops_degenerate_curated_documents_only():
    docs = [("ArXiv", DEGENERATE), ("Gutenberg (PG-19)", DEGENERATE), ("Github", DEGENERATE)]
    kept, drops = run(FilterConfig(), docs)
    assert kept == ["Github"]  # code is exempt
    assert drops == [("ArXiv", LIGHT_RULE_REASON), ("Gutenberg (PG-19)", LIGHT_RULE_REASON)]
    kept, _ = run(FilterConfig(light=[]), docs)
    assert len(kept) == 3


def test_stats_report_what_each_rule_removes_per_component(tmp_path: Path):
    stats = TaskStats()
    for comp, text, reason in (("ArXiv", DEGENERATE, LIGHT_RULE_REASON), ("Pile-CC", WEB_BOILERPLATE, "c4_too_few_sentences")):
        nbytes = len(text.encode())
        stats.seen(comp, nbytes, len(text))
        stats.seen(comp, 3 * nbytes, len(text))
        stats.dropped(comp, reason, nbytes)
        stats.kept(comp, 3 * nbytes, len(text))
    stats.edited("Pile-CC", "c4_lines", 100)
    write_report(tmp_path, stats, {})
    report = (tmp_path / "stats.md").read_text()
    assert "## What each rule removes, per component" in report
    assert f"| ArXiv | {LIGHT_RULE_REASON} | 1 |" in report and "| 25.0 |" in report
    assert "| Pile-CC | c4_too_few_sentences | 1 |" in report and "| Pile-CC | edit:c4_lines | 1 |" in report
