"""A pilelm run exported to GGUF (``pilelm export --format gguf``) and run by llama.cpp
(llama-cpp-python, the ``bench`` extra): same greedy continuations, same perplexity.

For each run: the GGUF file in F16 and Q8_0; held-out documents (a prepared dir's test split)
tokenized by pilelm's tokenizer (the table says whether llama.cpp's tokenizer gives the same
ids; the comparisons feed both engines pilelm's ids); greedy continuations of ``--new-tokens``
tokens after the first ``--prompt-tokens`` tokens of ``--prompts`` documents (pilelm: its fp32
KV-cached decoding; llama.cpp: argmax of its logits, one token at a time); perplexity over
windows of ``block_size`` tokens of the held-out stream (documents joined by the
end-of-document token), each window scored from its first token, in both engines.
Targets (issue 31): F16 continuations identical, perplexity within 0.5 %.

    .venv/bin/python benchmarks/gguf_llamacpp.py RUN... --prepared PREPARED_DIR
        [--prompts 8] [--prompt-tokens 16] [--new-tokens 32] [--windows 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pilelm.compress.report import greedy_decode
from pilelm.data.prepared import iter_documents, split_files
from pilelm.interop.gguf_export import write_gguf
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.training.checkpoint import load_for_inference


def load_llama(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), V) logits of every position, from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given logits[:-1]."""
    z = logits[:-1]
    logz = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    return float((logz - z[np.arange(len(ids) - 1), ids[1:]]).sum())


def pilelm_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0][0].double().numpy()


def compare(run: str, texts: list[str], args, tmp: Path) -> None:
    model, cfg, tok_dir = load_for_inference(run)
    model = model.float()
    tok = load_tokenizer(tok_dir)
    eod = tok.eod_id
    docs = [tok.encode(t) for t in texts]
    prompts = [d[: args.prompt_tokens] for d in docs if len(d) >= args.prompt_tokens][: args.prompts]
    stream: list[int] = []
    for d in docs[args.prompts:]:  # held-out documents the prompts did not come from
        stream += [eod, *d]
    T = cfg.block_size
    windows = [stream[i : i + T] for i in range(0, len(stream) - T + 1, T)][: args.windows]
    ours_greedy = [list(r) for r in zip(*greedy_decode(model, prompts, args.new_tokens), strict=True)]
    ours_nll = sum(nll_sum(pilelm_logits(model, w), w) for w in windows)
    n_pred = sum(len(w) - 1 for w in windows)
    ppl_ours = math.exp(ours_nll / n_pred)
    print(f"\n{run}: {cfg.arch} d={cfg.d_model} L={cfg.n_layer} qk_norm={cfg.qk_norm} mlp={cfg.mlp}; "
          f"{len(prompts)} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new; perplexity over "
          f"{len(windows)} windows of {T} tokens ({n_pred} predictions); pilelm fp32 perplexity {ppl_ours:.3f}")
    print("| GGUF | llama.cpp arch | MB | same tokenization | identical continuations | same tokens "
          "| first divergence | perplexity | vs pilelm |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for gguf_type in args.types:
        path = tmp / f"{Path(run).name}-{gguf_type}.gguf"
        info = write_gguf(path, model, cfg, load_tokenizer(tok_dir, fast=False), gguf_type)
        llm = load_llama(path, T, args.threads)
        same_tok = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == d for t, d in zip(texts, docs,
                                                                                                  strict=True))
        theirs = [llama_greedy(llm, p, args.new_tokens) for p in prompts]
        identical = sum(a == b for a, b in zip(ours_greedy, theirs, strict=True))
        same = sum(x == y for a, b in zip(ours_greedy, theirs, strict=True) for x, y in zip(a, b, strict=True))
        diverge = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
                   for a, b in zip(ours_greedy, theirs, strict=True)]
        first = min((d for d in diverge if d is not None), default=None)
        ppl = math.exp(sum(nll_sum(llama_logits(llm, w), w) for w in windows) / n_pred)
        print(f"| {gguf_type.upper()} | {info['architecture']} | {path.stat().st_size / 1e6:.1f} "
              f"| {same_tok}/{len(texts)} docs | {identical}/{len(prompts)} | {same / (len(prompts) * args.new_tokens):.1%} "
              f"| {'-' if first is None else first} | {ppl:.3f} | {(ppl / ppl_ours - 1) * 100:+.2f} % |", flush=True)
        del llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--prepared", required=True, help="prepared dir whose test split gives the held-out text")
    ap.add_argument("--split", default="test")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = [d.text for d in iter_documents(split_files(args.prepared, args.split))]
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}; held-out text: {len(texts)} documents of {args.prepared}/{args.split}")
    with tempfile.TemporaryDirectory(prefix="gguf_llamacpp_") as tmp:
        for run in args.runs:
            compare(run, texts, args, Path(tmp))


if __name__ == "__main__":
    main()
