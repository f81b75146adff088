"""The simple methods a user would reach for instead of a fine-tune, scored on the same split.

A fine-tune is worth its cost only where it beats them, so ``pilelm finetune`` reports them
beside its own scores (``results.json`` "baselines", the "Baselines" table of ``results.md``):

- classify: TF-IDF + logistic regression (scikit-learn; word uni- and bigrams, sublinear tf,
  classes weighted by inverse frequency), the standard text-classification baseline (e.g.
  Wang & Manning 2012; scikit-learn's "Classification of text documents using sparse
  features" example). The class weights matter where the metric is macro-F1 and classes are
  unbalanced: on the demo's validation split they raise its macro-F1 from 0.485 to 0.927
  (``benchmarks/applications.py``), so the baseline is the strong one;
- ner: the majority tag of each word in the training data, "O" for an unseen word (the
  baseline of the CoNLL-2003 shared task, Tjong Kim Sang & De Meulder 2003, sec. 5);
- punct: the unchanged input (no mark, no capital: what the model reads) and a rule (capital
  on the first word and after a full stop, a full stop at the end).

Each baseline trains on the train split only and predicts the val and test splits.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pilelm.finetune.tasks import Task, TaskData

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")


def tfidf_logreg(train_texts: list[str], train_labels: list[int], texts: list[str]) -> list[int]:
    """Label ids of ``texts`` from TF-IDF + logistic regression fitted on the training texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          LogisticRegression(max_iter=1000, class_weight="balanced"))
    model.fit(train_texts, train_labels)
    return [int(x) for x in model.predict(texts)]


def majority_tags(train_words: list[list[str]], train_tags: list[list[str]],
                  sentences: list[list[str]], default: str = "O") -> list[list[str]]:
    """Each word's most frequent training tag (ties: the tag seen first), ``default`` if unseen."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for words, tags in zip(train_words, train_tags, strict=True):
        for w, t in zip(words, tags, strict=True):
            counts[w][t] += 1
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return [[best.get(w, default) for w in words] for words in sentences]


def unchanged_punct(words: list[str]) -> list[str]:
    """The input as it is: no mark and no capital on any word."""
    return ["O+lower"] * len(words)


def rule_punct(words: list[str]) -> list[str]:
    """Capital on the first word and after a full stop; a full stop after the last word."""
    labels = []
    for i in range(len(words)):
        mark = "PERIOD" if i == len(words) - 1 else "O"
        case = "Cap" if i == 0 or labels[-1].startswith("PERIOD") else "lower"
        labels.append(f"{mark}+{case}")
    return labels


def baseline_predictions(task: str, data: TaskData, split: str) -> dict[str, list[Any]]:
    """name -> predictions (in the task's gold format) of each baseline on ``split``."""
    inputs = data.inputs.get(split)
    if not inputs:
        return {}
    if task == "classify":
        return {"TF-IDF + logistic regression": tfidf_logreg(data.inputs["train"], data.gold["train"], inputs)}
    if task == "ner":
        return {"majority tag per word": majority_tags(data.inputs["train"], data.gold["train"], inputs)}
    if task == "punct":
        return {"unchanged text": [unchanged_punct(w) for w in inputs],
                "rule (capital after a full stop, full stop at the end)": [rule_punct(w) for w in inputs]}
    return {}


def score_baselines(task: Task, data: TaskData) -> dict[str, dict[str, Any]]:
    """name -> {split: the task's metrics} for every baseline of ``task``."""
    out: dict[str, dict[str, Any]] = {}
    for split in EVAL_SPLITS:
        for name, pred in baseline_predictions(task.name, data, split).items():
            assert task.score is not None
            out.setdefault(name, {})[split] = task.score(data.gold[split], pred, data.labels)
    return out


def baseline_table(results: dict[str, Any]) -> list[str]:
    """Markdown: the fine-tune and each baseline on the test split (else val): main metric,
    then the per-label / per-type / per-mark F1."""
    baselines = results.get("baselines") or {}
    split = "test" if "test" in results else "val"
    if not baselines or split not in results:
        return []
    rows = {"fine-tuned": results[split]} | {name: by_split[split] for name, by_split in baselines.items()
                                             if split in by_split}
    detail_key = next((k for k in ("per_label", "per_type", "per_mark") if k in results[split]), "")
    names = list(dict.fromkeys(n for m in rows.values() for n in m.get(detail_key, {})))
    extra = (["case F1"] if "case_f1" in results[split] else [])
    lines = ["**Baselines** (" + split + " split, same examples): " + results["metric"], "",
             "| method | " + results["metric"] + " | " + " | ".join([*(f"{n} F1" for n in names), *extra]) + " |",
             "|---|---:|" + "---:|" * (len(names) + len(extra))]
    for name, m in rows.items():
        cells = [f"{m.get(detail_key, {}).get(n, {}).get('f1', 0.0):.4f}" for n in names]
        cells += [f"{m['case_f1']:.4f}"] if extra else []
        lines.append(f"| {name} | {m['main']:.4f} | " + " | ".join(cells) + " |")
    return [*lines, ""]
