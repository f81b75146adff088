"""``pilelm eval``: bits per byte and perplexity per Pile component of one or more runs side by
side, with the unigram baseline; BLEU / chrF of conditional generation.

Input: a shard dir (``pilelm tokenize`` output; its tokenizer must be the run's) or a prepared
dir (``pilelm prepare`` output; each run's tokenizer encodes the text). Output (``-o EVAL``):
``results.json``, ``results.md``, ``bpb.png``, ``manifest.json``.

The parts: ``config`` (``EvalConfig``), ``runs`` (the checkpoints compared), ``documents``
(the split to score), ``bpb`` (sliding-window scoring, metrics per component, the unigram
baseline), ``bleu`` (BLEU / chrF), ``retrieval`` (``--task retrieval``), ``results`` (the
files written and the run report's section).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pilelm.core.manifest import Timer, clear_manifest, write_manifest
from pilelm.evaluation.bleu import run_bleu
from pilelm.evaluation.bpb import aggregate, score_documents, score_unigram, unigram_logprobs
from pilelm.evaluation.config import EvalConfig
from pilelm.evaluation.documents import DocumentSet, open_eval_data
from pilelm.evaluation.results import write_results
from pilelm.evaluation.runs import resolve_runs
from pilelm.inference.textstream import unescape
from pilelm.models import spec_for
from pilelm.models.dtypes import DTYPES
from pilelm.training.checkpoint import load_for_inference

log = logging.getLogger(__name__)


def run_eval(cfg: EvalConfig) -> Path:
    if cfg.task == "retrieval":
        from pilelm.evaluation.retrieval import run_retrieval_eval

        return run_retrieval_eval(cfg, resolve_runs(cfg.runs, cfg.all_checkpoints))
    if not cfg.runs:
        raise ValueError("eval needs at least one run: pilelm eval RUN_DIR... --data DATA_DIR -o EVAL_DIR")
    if not cfg.output:
        raise ValueError("eval needs an output folder: -o EVAL_DIR")
    if not cfg.data and not cfg.bleu_data:
        raise ValueError("eval needs --data (shard or prepared dir) and/or --bleu-data (prompt/reference JSONL)")
    out = Path(cfg.output)
    timer = Timer()
    runs = resolve_runs(cfg.runs, cfg.all_checkpoints)
    data = open_eval_data(cfg.data, cfg.split, cfg.max_documents) if cfg.data else None
    results: dict[str, Any] = {"runs": {}, "baselines": {}}
    settings: dict[str, Any] = {"data": cfg.data, "split": cfg.split}
    first_docs: DocumentSet | None = None
    first_tok: Path | None = None
    for spec in runs:
        model, model_cfg, tok_dir = load_for_inference(spec.run_dir, spec.step, cfg.device)
        if not spec_for(model_cfg).causal:
            raise ValueError(f"run {spec.run_dir} holds a {type(model_cfg).__name__} model; eval scores causal LMs")
        model = model.to(DTYPES[cfg.dtype])
        entry: dict[str, Any] = {"run": str(spec.run_dir), "step": spec.step}
        if data is not None:
            context = cfg.context or model_cfg.block_size
            if context > model_cfg.block_size:
                raise ValueError(f"context {context} exceeds the context of {spec.name} ({model_cfg.block_size})")
            stride = cfg.stride or max(1, context // 2)
            if stride > context:
                raise ValueError(f"stride ({stride}) must not exceed the window ({context})")
            with timer("tokenize"):
                docs = data.documents(tok_dir)
            if first_docs is None:
                first_docs, first_tok = docs, tok_dir
            with timer(f"score {spec.name}"):
                nll, counts = score_documents(model, docs, context, stride, cfg.batch_tokens,
                                              next(model.parameters()).device, spec.name)
            entry.update(aggregate(nll, counts, docs))
            entry.update({"context": context, "stride": stride})
            log.info("%s: %.4f bits per byte over %d documents", spec.name, entry["overall"]["bpb"], len(docs.tokens))
        if cfg.bleu_data:
            with timer(f"bleu {spec.name}"):
                entry["generation"] = run_bleu(
                    model, tok_dir, cfg.bleu_data, max_new_tokens=cfg.bleu_max_new_tokens,
                    num_beams=cfg.bleu_num_beams, stop=[unescape(s) for s in cfg.bleu_stop],
                    batch_size=cfg.bleu_batch_size,
                )
            log.info("%s: BLEU %.2f chrF %.2f", spec.name, entry["generation"]["bleu"], entry["generation"]["chrf"])
        results["runs"][spec.name] = entry
        del model
    if data is not None and cfg.unigram and first_docs is not None and first_tok is not None:
        with timer("unigram"):
            counts = data.train_token_counts(first_tok, first_docs.vocab_size)
        if counts is None:
            log.warning("%s has no train split: no unigram baseline", cfg.data)
        else:
            logp = unigram_logprobs(counts, first_docs.vocab_size)
            results["baselines"]["unigram"] = aggregate(*score_unigram(logp, first_docs), first_docs)
    if first_docs is not None:
        settings.update(documents=len(first_docs.tokens), context=cfg.context or "model", stride=cfg.stride or "context/2")
    clear_manifest(out)
    write_results(out, results, settings)
    inputs = list(dict.fromkeys([r.run_dir for r in runs]))
    inputs += [Path(p) for p in (cfg.data, cfg.bleu_data) if p]
    counts = {"runs": len(runs), "documents": len(first_docs.tokens) if first_docs is not None else 0}
    write_manifest(out, "eval", cfg, inputs=inputs, counts=counts, timings=timer.timings, extra={"settings": settings})
    return out
