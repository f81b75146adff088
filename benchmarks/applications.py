"""Applications against the simple method a user would otherwise reach for, on the demo's data.

One table per application, each on the exact split ``pilelm finetune`` uses (the split is
built by ``finetune.tasks.split_sources`` from the same config, so the records are the same):

- classification (``pilelm demo``'s classify stage: the Pile component of each document of the
  bundled sample's prepared splits): TF-IDF + logistic regression and the majority class,
  beside the fine-tune's test macro-F1 read from ``DEMO/classify/results.json`` when given;
- punctuation restoration (``pilelm run finetune``'s punct stage: 500 seeded test windows):
  per-mark precision/recall/F1 of the unchanged text and of the full-stop rule, beside the
  fine-tune's from ``FINETUNE/punct/results.json`` when given;
- summaries (``sft.examples=lead`` on the sample's test file): ROUGE-1/2/L of lead-1 (the
  source's first sentence), beside before/after from ``SFT/results.json`` when given;
- topics (``--index INDEX``): NPMI coherence of ``pilelm topics`` and of scikit-learn's LDA with
  the same k on the same documents.

The baselines need no model and run in seconds; the fine-tunes are the demo's own runs (each
finetune output also carries these baselines in its ``results.md``).

    python benchmarks/applications.py [-o runs/applications] [--demo runs/demo] [--finetune runs/finetune] [--sft runs/lead]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pilelm.core.config import load_yaml
from pilelm.core.runner import run_stage
from pilelm.finetune.baselines import rule_punct, tfidf_logreg, unchanged_punct
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.metrics import classification_metrics, punctuation_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pilelm" / "sample"
DEMO_YAML = ROOT / "pilelm" / "configs" / "pipelines" / "demo.yaml"
FINETUNE_YAML = ROOT / "pilelm" / "configs" / "pipelines" / "finetune.yaml"
MARKS = ("COMMA", "PERIOD", "QUESTION")


def stage_of(pipeline: Path, name: str, task: str = "") -> dict:
    for stage in load_yaml(pipeline)["stages"]:
        if stage["stage"] == name and (not task or stage.get("task") == task):
            return {k: v for k, v in stage.items() if k != "stage"}
    raise KeyError(f"{pipeline} has no {name} {task} stage")


def prepared_sample(work: Path) -> Path:
    """The sample prepared as ``pilelm demo`` prepares it (its filters), reused when present."""
    cfg = stage_of(DEMO_YAML, "prepare")
    cfg["inputs"] = [x.replace("{sample}", str(SAMPLE)) for x in cfg["inputs"]]
    out = work / "prepared"
    if (out / "manifest.json").is_file():
        return out
    return run_stage("prepare", **{**cfg, "output": str(out)})


def read_json(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def classify_table(prep: Path, demo: Path | None) -> list[str]:
    from pilelm.finetune.records import read_text_records
    from pilelm.finetune.tasks import split_sources

    stage = stage_of(DEMO_YAML, "finetune", "classify")
    cfg = FinetuneConfig(task="classify", data=[str(prep)], label_column=stage["label_column"])
    splits = split_sources(cfg, lambda files: [r for f in files for r in read_text_records(f, cfg.text_column,
                                                                                             cfg.label_column)])
    labels = sorted({r.label for r in splits["train"]})
    ids = {s: [labels.index(r.label) for r in rs] for s, rs in splits.items()}
    texts = {s: [r.text for r in rs] for s, rs in splits.items()}
    majority = Counter(ids["train"]).most_common(1)[0][0]
    rows = {"majority class": classification_metrics(ids["test"], [majority] * len(ids["test"]), labels),
            "TF-IDF + logistic regression": classification_metrics(
                ids["test"], tfidf_logreg(texts["train"], ids["train"], texts["test"]), labels)}
    tuned = read_json(demo / "classify" / "results.json" if demo else None)
    if tuned:
        rows = {f"fine-tuned ({demo.name}/classify)": tuned["test"]} | rows
    lines = [f"**Classification** (Pile component; {len(ids['train'])} train / {len(ids['test'])} test documents "
             "of the demo's prepared sample)", "", "| method | macro-F1 | accuracy |", "|---|---:|---:|"]
    lines += [f"| {name} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} |" for name, m in rows.items()]
    if not tuned:
        lines.append("| fine-tuned | (give --demo runs/demo after `pilelm demo`) | |")
    return [*lines, ""]


def punct_table(prep: Path, finetune: Path | None) -> list[str]:
    from pilelm.finetune import punct
    from pilelm.finetune.records import read_text_records
    from pilelm.finetune.tasks import split_sources

    stage = stage_of(FINETUNE_YAML, "finetune", "punct")
    cfg = FinetuneConfig(task="punct", data=[str(prep)], max_train_examples=stage["max_train_examples"],
                         max_eval_examples=stage["max_eval_examples"])

    def read(files: list[Path]) -> list[punct.LabelledWords]:
        out = []
        for f in files:
            for r in read_text_records(f, cfg.text_column, cfg.text_column):
                lw, n = punct.label_text(r.text), cfg.words_per_example
                out += [punct.LabelledWords(lw.words[i:i + n], lw.labels[i:i + n])
                        for i in range(0, len(lw.words), n) if lw.words[i:i + n]]
        return out

    test = split_sources(cfg, read)["test"]
    gold = [t for x in test for t in x.labels]
    rows = {"unchanged text": punctuation_metrics(gold, [t for x in test for t in unchanged_punct(x.words)]),
            "rule (capital after a full stop, full stop at the end)":
                punctuation_metrics(gold, [t for x in test for t in rule_punct(x.words)])}
    tuned = read_json(finetune / "punct" / "results.json" if finetune else None)
    if tuned and "test" in tuned:
        rows = {f"fine-tuned ({finetune.name}/punct)": tuned["test"]} | rows
    cols = [f"{m} P / R / F1" for m in MARKS] + ["capitals F1"]
    lines = [f"**Punctuation restoration** ({len(test)} test windows, {len(gold)} words)", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows.items():
        cells = [" / ".join(f"{m['per_mark'][k][x]:.2f}" for x in ("precision", "recall", "f1")) for k in MARKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['case_f1']:.2f} |")
    if not tuned:
        lines.append("| fine-tuned | (give --finetune runs/finetune after `pilelm run finetune`) | | | |")
    return [*lines, ""]


SENTENCE = re.compile(r"^(.{20,}?[.!?])(?:\s+(?=[A-Z\"“(])|$)", re.S)  # as sft.conversations finds a lead


def first_sentence(text: str) -> str:
    m = SENTENCE.match(text.strip())
    return (m.group(1) if m else text.strip().split("\n")[0]).strip()


def summary_table(sft: Path | None) -> list[str]:
    from pilelm.evaluation.rouge import rouge
    from pilelm.finetune.sft.conversations import LEAD_PROMPT, mine_conversations

    convs = mine_conversations("lead", [SAMPLE / "test.jsonl.zst"], Counter())
    sources = [c.messages[0]["content"][len(LEAD_PROMPT):] for c in convs]
    refs = [c.messages[c.reply_index]["content"] for c in convs]
    lead = [first_sentence(s) for s in sources]
    rows = {"lead-1 (the source's first sentence)": rouge(lead, refs)}
    tuned = read_json(sft / "results.json" if sft else None)
    if tuned:
        rows = {"before fine-tuning": tuned["before"], "after fine-tuning": tuned["after"]} | rows
    lines = [f"**Summaries** (`sft.examples=lead`, {len(convs)} test entries of the sample: body -> first sentence)",
             "", "| method | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} |" for n, m in rows.items()]
    if not tuned:
        lines.append("| fine-tuned | (give --sft FT_DIR after `pilelm finetune RUN --task sft sft.examples=lead`) | | |")
    return [*lines, ""]


def topics_table(index_dir: Path | None, k: int, terms: int, work: Path) -> list[str]:
    """NPMI of ``pilelm topics`` (k-means on the index's vectors, c-TF-IDF words) and of
    scikit-learn's LDA, same documents, same k, same number of words per topic."""
    if index_dir is None:
        return ["**Topics**: give --index INDEX_DIR (a `pilelm embed` output) to compare with LDA", ""]
    from pilelm.retrieval.index import VectorIndex
    from pilelm.retrieval.topic_coherence import document_words, lda_topics, npmi_coherence

    out = run_stage("topics", index=str(index_dir), k=k, terms=terms, output=str(work / f"topics-k{k}"))
    ours = [[w for w, _ in t["words"]] for t in json.loads((out / "topics.json").read_text())["topics"]]
    index = VectorIndex(index_dir)
    words = document_words(index_dir, len(index))
    sets = [set(w) for w in words]
    rows = {"pilelm topics (k-means on the vectors + c-TF-IDF)": npmi_coherence(ours, sets),
            "scikit-learn LDA": npmi_coherence(lda_topics(words, k, terms), sets)}
    lines = [f"**Topics** ({len(index)} documents of {index_dir.name}, k={k}, {terms} words per topic; NPMI over "
             "the same documents, higher is more coherent)", "", "| model | mean NPMI | min | max |",
             "|---|---:|---:|---:|"]
    lines += [f"| {n} | {np.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} |" for n, v in rows.items()]
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/applications"))
    ap.add_argument("--demo", type=Path, default=None, help="a `pilelm demo` work dir (its classify/results.json)")
    ap.add_argument("--finetune", type=Path, default=None, help="a `pilelm run finetune` work dir (punct/results.json)")
    ap.add_argument("--sft", type=Path, default=None, help="a `--task sft sft.examples=lead` output (results.json)")
    ap.add_argument("--index", type=Path, default=None, help="a `pilelm embed` index to compare topics with LDA")
    ap.add_argument("--topics", type=int, default=20, help="k of both topic models")
    args = ap.parse_args()
    work = args.output.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = prepared_sample(work)
    text = "\n".join([*classify_table(prep, args.demo), *punct_table(prep, args.finetune), *summary_table(args.sft),
                      *topics_table(args.index, args.topics, 8, work)])
    (work / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
