"""``pilelm eval --task retrieval``: find each question's answer among all the answers.

Pairs come from the StackExchange documents of a split (the Pile writes a thread as
``Q:\\n\\n<question>\\n\\nA:\\n\\n<answer>...``; the first answer is the question's positive). Every
question is a query over the corpus of all the pairs' answers; a model embeds both (its pooled,
normalised states; answers longer than the context are chunked and score their best chunk) and
ranks by cosine. BM25 (Robertson & Zaragoza 2009; ``bm25s``, Lucene's variant, English stop
words) ranks the same pairs as the baseline a dense retriever has to beat, and each run is also
fused with BM25 by reciprocal rank fusion (``rank_fusion``: each ranking's top 100, k = 60), the
hybrid that ``pilelm search`` and RAG use by default: plain (both rankings weigh 1) and
calibrated (the dense weight that gives the best MRR@10 on the pairs of another held-out split,
val for test and test for val, so the evaluated pairs never choose it; 1 when there is none).

    recall@k = share of questions whose answer ranks in the top k (k = 1, 10, 100)
    MRR@10   = mean of 1 / rank over questions, 0 when the rank is past 10

Ties count against the answer (its rank is 1 + the number of answers scoring at least as
high), so a model that gives every answer one score does not look perfect.

Output (``-o EVAL``): ``results.json``, ``results.md``, ``retrieval.png``, ``manifest.json``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pilelm.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from pilelm.core.manifest import MANIFEST, Timer, clear_manifest, read_manifest, write_manifest
from pilelm.evaluation.rank_fusion import DEPTH, calibrate_dense_weight, fused_score_matrix, rank_positions
from pilelm.models.dtypes import DTYPES

if TYPE_CHECKING:
    from pilelm.evaluation.config import EvalConfig
    from pilelm.evaluation.runs import RunSpec

log = logging.getLogger(__name__)

STACKEXCHANGE = "StackExchange"
KS = (1, 10, 100)
MRR_AT = 10
# The Pile's StackExchange layout: "Q:\n\n" question, then each answer after "\n\nA:\n\n".
_ANSWER = re.compile(r"\n\s*A:\s*\n")


def qa_pair(text: str) -> tuple[str, str] | None:
    """(question, first answer) of a StackExchange thread, or None if it has no answer."""
    text = text.strip()
    if not text.startswith("Q:"):
        return None
    parts = _ANSWER.split(text[2:])
    if len(parts) < 2:
        return None
    question, answer = parts[0].strip(), parts[1].strip()
    return (question, answer) if question and answer else None


def read_qa_pairs(data: str, split: str, limit: int = 0) -> list[tuple[str, str]]:
    """The StackExchange pairs of a prepared dir's split (or of document files)."""
    from pilelm.data.prepared import split_files
    from pilelm.data.readers import read_documents

    path = Path(data)
    if (path / MANIFEST).is_file():
        if read_manifest(path).get("stage") != "prepare":
            raise ValueError(f"{path}: eval --task retrieval reads a prepared dir (pilelm prepare) or document files")
        files: list[Any] = split_files(path, split)
        if not files:
            raise FileNotFoundError(f"{path} has no {split} split ({split}/*.jsonl.zst)")
    else:
        files = [data]
    pairs = []
    for doc in read_documents(files):
        if doc.component != STACKEXCHANGE:
            continue
        pair = qa_pair(doc.text)
        if pair is not None:
            pairs.append(pair)
            if limit and len(pairs) >= limit:
                break
    if len(pairs) < 2:
        raise ValueError(f"{data} ({split}) has {len(pairs)} StackExchange question/answer pairs; "
                         "retrieval evaluation needs at least 2")
    return pairs


def gold_ranks(scores: np.ndarray) -> np.ndarray:
    """(Q, D) scores with query i's answer at column i -> each answer's 1-based rank (ties count against)."""
    gold = np.diagonal(scores)[:, None]
    return (scores >= gold).sum(axis=1)  # the answer itself is one of them


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in KS}
    out[f"mrr@{MRR_AT}"] = float(np.mean(np.where(ranks <= MRR_AT, 1.0 / ranks, 0.0)))
    out["queries"] = int(len(ranks))
    return out


def bm25_words(texts: list[str]) -> list[list[str]]:
    """The words BM25 indexes and queries by: ``bm25s``'s lower-cased word split, English stop
    words out (the same function at index and query time, or scores would not match)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its DEBUG lines name every build step
    return bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)


def bm25_retriever(texts: list[str]) -> Any:
    """A ``bm25s.BM25`` over ``texts`` (one row per text)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def bm25_query_scores(retriever: Any, words: list[str]) -> np.ndarray:
    """One query's BM25 score of every indexed text (zeros when none of its words is indexed)."""
    known = retriever.get_tokens_ids(words)
    if not known:
        return np.zeros(int(retriever.scores["num_docs"]), dtype=np.float32)
    return np.asarray(retriever.get_scores(known), dtype=np.float32)


def bm25_scores(questions: list[str], answers: list[str]) -> np.ndarray:
    """(Q, D) BM25 scores of every answer for every question."""
    retriever = bm25_retriever(answers)
    return np.stack([bm25_query_scores(retriever, q) for q in bm25_words(questions)]).astype(np.float32)


def hybrid_scores(dense: np.ndarray, bm25: np.ndarray, depth: int = DEPTH, dense_weight: float = 1.0) -> np.ndarray:
    """(Q, D) RRF scores of a dense and a BM25 ranking, each cut to its top ``depth``; BM25 does
    not retrieve an answer sharing no word with the question (score 0)."""
    return fused_score_matrix([rank_positions(bm25, depth, floor=0.0), rank_positions(dense, depth)],
                              weights=[1.0, dense_weight])


def calibration_scores(cfg: EvalConfig, encoder: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(dense, BM25) scores of another held-out split's pairs (val for test, test for val), or
    None when the data has no such split with pairs."""
    other = "val" if cfg.split != "val" else "test"
    try:
        pairs = read_qa_pairs(cfg.data, other, cfg.max_documents) if (Path(cfg.data) / MANIFEST).is_file() else []
    except (FileNotFoundError, ValueError):
        pairs = []
    if len(pairs) < 2:
        return None
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    return dense_scores(encoder, questions, answers)[0], bm25_scores(questions, answers)


def dense_scores(encoder: Any, questions: list[str], answers: list[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
    """(Q, D) cosine scores (an answer scores its best chunk) and how many questions were cut
    to fit the context."""
    vectors, owner = encoder.embed_documents(answers, batch_size=batch_size)
    q_ids = encoder.tokenize(questions)
    cut = sum(len(q) > encoder.max_tokens for q in q_ids)
    q_ids = [q[: encoder.max_tokens] or [encoder.pad_id] for q in q_ids]
    chunk_scores = encoder.embed_ids(q_ids, batch_size) @ vectors.T  # (Q, chunks), chunks ordered by answer
    starts = np.searchsorted(owner, np.arange(len(answers)))
    return np.maximum.reduceat(chunk_scores, starts, axis=1), cut


def result_rows(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Table rows: each run dense, each run fused with BM25 (hybrid), then the baselines."""
    rows = {f"{k} (dense)": v for k, v in results["runs"].items()}
    rows |= {f"{k} + bm25 (hybrid, plain RRF)": v for k, v in results.get("hybrid_plain", {}).items()}
    rows |= {f"{k} + bm25 (hybrid, dense weight {v.get('dense_weight', 1.0):g})": v
             for k, v in results.get("hybrid", {}).items()}
    return rows | {f"{k} (baseline)": v for k, v in results["baselines"].items()}


def results_markdown(results: dict[str, Any]) -> str:
    cols = [f"recall@{k}" for k in KS] + [f"mrr@{MRR_AT}"]
    lines = [f"# Retrieval QA: {results['pairs']} StackExchange question/answer pairs ({results['split']} split)", "",
             "Each question is a query over all the pairs' answers.", "",
             "| retriever | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in result_rows(results).items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_retrieval(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: recall@1, recall@10 and MRR@10 per retriever."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result_rows(results)
    cols = [f"recall@{k}" for k in KS] + [f"mrr@{MRR_AT}"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (name, m) in enumerate(rows.items()):
        ax.bar(np.arange(len(cols)) + i * width, [m[c] for c in cols], width=width, label=name)
    ax.set_xticks(np.arange(len(cols)) + width * (len(rows) - 1) / 2, cols)
    ax.set_ylim(0, 1)
    ax.set_ylabel("higher is better")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_retrieval_eval(cfg: EvalConfig, runs: list[RunSpec]) -> Path:
    """The retrieval task of ``pilelm eval`` over ``runs`` (resolved by the eval stage)."""
    from pilelm.inference.text_encoder import TextEncoder

    if not cfg.runs or not cfg.data or not cfg.output:
        raise ValueError("eval --task retrieval needs runs, data and an output: "
                         "pilelm eval RUN_DIR... --task retrieval --data PREPARED_DIR -o EVAL_DIR")
    out = Path(cfg.output)
    timer = Timer()
    pairs = read_qa_pairs(cfg.data, cfg.split, cfg.max_documents)
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    results: dict[str, Any] = {"pairs": len(pairs), "split": cfg.split, "runs": {}, "hybrid": {},
                               "hybrid_plain": {}, "baselines": {}}
    with timer("bm25"):
        bm25 = bm25_scores(questions, answers)
        results["baselines"]["bm25"] = rank_metrics(gold_ranks(bm25))
    for spec in runs:
        with timer(f"embed {spec.name}"):
            encoder = TextEncoder.from_run(spec.run_dir, spec.step, cfg.pooling, cfg.device, DTYPES[cfg.dtype])
            scores, cut = dense_scores(encoder, questions, answers)
            calibration = calibration_scores(cfg, encoder)
        results["runs"][spec.name] = {**rank_metrics(gold_ranks(scores)), "pooling": cfg.pooling,
                                      "questions_cut_to_context": cut}
        weight, table = 1.0, {}
        if calibration is not None:
            weight, table = calibrate_dense_weight(*calibration, gold=np.arange(len(calibration[0])))
        results["hybrid_plain"][spec.name] = rank_metrics(gold_ranks(hybrid_scores(scores, bm25)))
        results["hybrid"][spec.name] = {**rank_metrics(gold_ranks(hybrid_scores(scores, bm25, dense_weight=weight))),
                                        "dense_weight": weight, "calibration_mrr@10": table}
        log.info("%s: MRR@10 dense %.3f, hybrid %.3f", spec.name, results["runs"][spec.name][f"mrr@{MRR_AT}"],
                 results["hybrid"][spec.name][f"mrr@{MRR_AT}"])
    clear_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    plot_retrieval(results, out / "retrieval.png")
    inputs = [*dict.fromkeys(r.run_dir for r in runs), Path(cfg.data)]
    write_manifest(out, "eval", cfg, inputs=inputs, counts={"runs": len(runs), "pairs": len(pairs)},
                   timings=timer.timings, extra={"task": "retrieval"})
    return out
