"""ROUGE-1/2/L F-measures (Lin 2004) through Google's ``rouge-score`` package, the
reimplementation of the reference ROUGE-1.5.5 Perl script that summarisation papers report
(``rouge_score.rouge_scorer``; Porter stemming on, as ROUGE-1.5.5's ``-m``)."""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs, in percent (0-100, as papers print them)."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return {t: 0.0 for t in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        for t, s in scorer.score(ref, hyp).items():
            totals[t] += s.fmeasure
    return {t: 100.0 * v / len(hypotheses) for t, v in totals.items()}
