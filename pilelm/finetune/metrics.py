"""Task metrics: classification, entity-level NER (seqeval), punctuation restoration.

Each returns a flat dict whose ``main`` entry is the number early stopping and model selection
watch (higher is better), plus the details the report prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pilelm.finetune.punct import MARKS, split_label


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def confusion_matrix(gold: list[int], pred: list[int], n: int) -> np.ndarray:
    """(n, n) counts: rows the gold label, columns the prediction."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the labels that occur in gold or prediction, per-label P/R/F1."""
    m = confusion_matrix(gold, pred, len(labels))
    per_label = {}
    f1s = []
    for i, name in enumerate(labels):
        tp = float(m[i, i])
        fp, fn = float(m[:, i].sum()) - tp, float(m[i, :].sum()) - tp
        if tp + fp + fn == 0:
            continue
        p, r, f = _prf(tp, fp, fn)
        per_label[name] = {"precision": p, "recall": r, "f1": f, "support": int(m[i, :].sum())}
        f1s.append(f)
    acc = float(np.trace(m) / max(1, m.sum()))
    macro = float(np.mean(f1s)) if f1s else 0.0
    return {"main": macro, "accuracy": acc, "macro_f1": macro, "per_label": per_label,
            "confusion": m.tolist(), "examples": int(m.sum())}


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    """Entity-level micro precision/recall/F1 and per type, as ``conlleval`` counts them
    (seqeval's default mode: an entity is right when its type and both ends are)."""
    from seqeval.metrics import classification_report

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    tokens = sum(len(s) for s in gold)
    correct = sum(g == p for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True))
    return {"main": float(micro["f1-score"]), "precision": float(micro["precision"]),
            "recall": float(micro["recall"]), "f1": float(micro["f1-score"]), "per_type": per_type,
            "token_accuracy": correct / max(1, tokens), "sentences": len(gold)}


def punctuation_metrics(gold: list[str], pred: list[str]) -> dict[str, Any]:
    """Per-mark precision/recall/F1 over words, micro-F1 over the marks (no-mark excluded, as
    in Tilk & Alumäe 2016 and later punctuation-restoration papers), and capitalisation F1."""
    gm = [split_label(x) for x in gold]
    pm = [split_label(x) for x in pred]
    per_mark = {}
    totals = [0.0, 0.0, 0.0]
    for mark in MARKS[1:]:
        tp = sum(g[0] == mark and p[0] == mark for g, p in zip(gm, pm, strict=True))
        fp = sum(g[0] != mark and p[0] == mark for g, p in zip(gm, pm, strict=True))
        fn = sum(g[0] == mark and p[0] != mark for g, p in zip(gm, pm, strict=True))
        p_, r_, f_ = _prf(tp, fp, fn)
        per_mark[mark] = {"precision": p_, "recall": r_, "f1": f_, "support": tp + fn}
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    mp, mr, mf = _prf(*totals)
    ctp = sum(g[1] == "Cap" and p[1] == "Cap" for g, p in zip(gm, pm, strict=True))
    cfp = sum(g[1] != "Cap" and p[1] == "Cap" for g, p in zip(gm, pm, strict=True))
    cfn = sum(g[1] == "Cap" and p[1] != "Cap" for g, p in zip(gm, pm, strict=True))
    _, _, cap_f1 = _prf(ctp, cfp, cfn)
    return {"main": (mf + cap_f1) / 2, "micro_precision": mp, "micro_recall": mr, "micro_f1": mf,
            "per_mark": per_mark, "case_f1": cap_f1, "words": len(gold)}
