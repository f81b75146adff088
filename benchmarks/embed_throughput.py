"""Embedding throughput and query latency: pilelm's ``TextEncoder`` vs transformers ``AutoModel``.

Throughput: both embed the same chunked documents with the same weights (a randomly
initialised pilelm GPT exported exactly to a transformers folder), mean pooling over the real
tokens, L2-normalised, same dtype, threads and batch size. Documents: the bundled sample's,
their lengths in tokens taken as UTF-8 bytes / 4 and chunked at the context (random ids: the
cost of a forward pass does not depend on which ids). transformers runs twice: in the corpus
order, and sorted by length as sentence-transformers' ``encode`` does; pilelm sorts by length
(``pilelm embed`` sorts within each part of ``part_docs`` documents, a bounded window). The
sides run interleaved ``--repeats`` times; the table gives the best time of each and the
median of the per-round ratios (a burst of load hits one round of both sides alike), and says
how far the vectors differ (they must agree to float noise).

Latency: ``--vectors`` random unit vectors in a flat (exact), IVF and HNSW index
(``retrieval/index.py``); p50 / p99 of one query at a time (k=10, ``search_one`` as
``pilelm search`` does), recall@10 against the exact
index; then end to end, ``--text-queries`` real questions one at a time: text -> tokens (a BPE
tokenizer trained on the sample) -> the model's pooled vector -> faiss search.

    .venv/bin/python benchmarks/embed_throughput.py [--shape small] [--batch 32] [--threads N]
        [--dtypes float32 bfloat16] [--vectors 100000] [--queries 1000] [--text-queries 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from generate_throughput import SHAPES  # noqa: E402

from pilelm.inference.text_encoder import TextEncoder  # noqa: E402
from pilelm.interop.gpt2_neox import gpt_hf_config, gpt_to_hf  # noqa: E402
from pilelm.models.gpt import GPT, GPTConfig  # noqa: E402
from pilelm.retrieval.index import build_faiss, search_one  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "pilelm" / "sample"


def corpus_chunks(block: int, vocab: int, docs: int) -> tuple[list[list[int]], int]:
    """Chunks (random ids) of the sample's first ``docs`` documents, lengths ~ bytes / 4."""
    from pilelm.data.readers import read_documents

    gen = np.random.default_rng(0)
    chunks, n = [], 0
    for doc in read_documents(sorted((SAMPLE / "train").glob("*.jsonl.zst"))):
        length = max(1, len(doc.text.encode()) // 4)
        for a in range(0, length, block):
            chunks.append(gen.integers(0, vocab, min(block, length - a)).tolist())
        n += 1
        if n == docs:
            break
    return chunks, n


def hf_embed(model, chunks: list[list[int]], batch: int, sort: bool) -> np.ndarray:
    """transformers AutoModel, mean pooling over the attention mask, as sentence-transformers does."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i])) if sort else list(range(len(chunks)))
    out = np.zeros((len(chunks), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            T = max(len(chunks[i]) for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            mask = torch.zeros(len(idx), T, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(chunks[i])] = torch.tensor(chunks[i])
                mask[r, : len(chunks[i])] = 1
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            out[idx] = F.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1).numpy()
    return out


def hf_auto_model(model: GPT, cfg: GPTConfig):
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        save_file(gpt_to_hf(cfg, model.state_dict()), str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / "config.json").write_text(gpt_hf_config(cfg, None, None, "float32").to_json_string())
        return transformers.AutoModel.from_pretrained(tmp, dtype=torch.float32).eval()


def throughput(args: argparse.Namespace) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPTConfig(arch="gpt2", **SHAPES[args.shape])
    base = GPT(cfg).eval()
    hf_base = hf_auto_model(base, cfg)
    chunks, docs = corpus_chunks(cfg.block_size, cfg.vocab_size, args.docs)
    tokens = sum(map(len, chunks))
    print(f"embedding {docs} documents = {len(chunks)} chunks, {tokens} tokens (context {cfg.block_size}); "
          f"{args.shape} GPT ({base.num_params(False) / 1e6:.0f}M), batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| dtype | pilelm docs/s | transformers docs/s (corpus order) | ratio best / paired median "
          "| transformers docs/s (length-sorted) | ratio best / paired median | max vector diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    stub = SimpleNamespace(cls_id=None, sep_id=None, pad_id=None)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        encoder = TextEncoder(base.to(dtype), cfg, stub)
        theirs = hf_base.to(dtype)
        warm = chunks[: args.batch]
        encoder.embed_ids(warm, args.batch)
        hf_embed(theirs, warm, args.batch, True)
        rounds, outs = paired([partial(encoder.embed_ids, chunks, args.batch),
                               partial(hf_embed, theirs, chunks, args.batch, False),
                               partial(hf_embed, theirs, chunks, args.batch, True)], args.repeats)
        t_ours, t_hf, t_sorted = rounds.min(axis=0)
        r_hf, r_sorted = (np.median(rounds[:, i] / rounds[:, 0]) for i in (1, 2))
        diff = float(np.abs(outs[0] - outs[1]).max())
        print(f"| {dtype_name} | {docs / t_ours:.1f} | {docs / t_hf:.1f} | {t_hf / t_ours:.2f}x / {r_hf:.2f}x "
              f"| {docs / t_sorted:.1f} | {t_sorted / t_ours:.2f}x / {r_sorted:.2f}x | {diff:.1e} |", flush=True)
        print(f"target: pilelm docs/s vs length-sorted transformers ({dtype_name}) >= 1.5x: paired median "
              f"{r_sorted:.2f}x, best-vs-best {t_sorted / t_ours:.2f}x ({'met' if r_sorted >= 1.5 else 'NOT met'}); "
              f"per-round ratios {' '.join(f'{x:.2f}' for x in rounds[:, 2] / rounds[:, 0])}", flush=True)
    base.float()


def paired(fns: list, repeats: int) -> tuple[np.ndarray, list]:
    """(repeats, len(fns)) wall times of the functions run in turn each round, and their
    first outputs."""
    times = np.zeros((repeats, len(fns)))
    outs: list = [None] * len(fns)
    for r in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn()
            times[r, i] = time.perf_counter() - t0
            if outs[i] is None:
                outs[i] = out
    return times, outs


def latency(args: argparse.Namespace) -> None:
    from pilelm.retrieval.index import import_faiss

    import_faiss()
    cfg = GPTConfig(arch="gpt2", **SHAPES[args.shape])
    dim = cfg.d_model
    gen = np.random.default_rng(0)
    x = gen.standard_normal((args.vectors, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Queries near stored vectors, as a real query is near its documents.
    q = x[gen.integers(0, args.vectors, args.queries)] + 0.05 * gen.standard_normal((args.queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"\nquery latency over {args.vectors} vectors of {dim} dims, {args.queries} queries one at a time, k=10\n")
    print("| index | build s | p50 ms | p99 ms | recall@10 vs exact |")
    print("|---|---:|---:|---:|---:|")
    exact = None
    indexes = {}
    for kind, dtype in [("flat", "float32"), ("flat", "float16"), ("ivf", "float32"), ("hnsw", "float32")]:
        t0 = time.perf_counter()
        index = build_faiss(x, kind, dtype)
        build = time.perf_counter() - t0
        if hasattr(index, "nprobe"):
            index.nprobe = 16
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = 64
        times, found = [], []
        for row in q:
            t0 = time.perf_counter()
            _, ids = search_one(index, row, 10)
            times.append(time.perf_counter() - t0)
            found.append(ids[0])
        found_arr = np.stack(found)
        if exact is None:
            exact = found_arr
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found_arr, exact, strict=True)])
        p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
        print(f"| {kind} {dtype} | {build:.2f} | {p50:.3f} | {p99:.3f} | {recall:.3f} |", flush=True)
        indexes[f"{kind} {dtype}"] = index
    end_to_end(args, cfg, indexes)


def sample_questions(n: int) -> list[str]:
    """Questions of the sample's StackExchange threads, then first lines of its other documents."""
    from pilelm.data.readers import read_documents
    from pilelm.evaluation.retrieval import qa_pair

    questions, lines = [], []
    for doc in read_documents(sorted(SAMPLE.rglob("*.jsonl.zst"))):
        pair = qa_pair(doc.text)
        if pair is not None:
            questions.append(" ".join(pair[0].split()[:48]))
        elif doc.text.strip():
            lines.append(" ".join(doc.text.split()[:24]))
    texts = questions + lines
    return [texts[i % len(texts)] for i in range(n)]


def end_to_end(args: argparse.Namespace, cfg: GPTConfig, indexes: dict) -> None:
    """text -> tokens -> pooled vector -> faiss search, one query at a time."""
    from pilelm.data.readers import read_documents
    from pilelm.tokens.tokenizer_train import train_tokenizer

    texts = [d.text for d in read_documents(sorted((SAMPLE / "train").glob("*.jsonl.zst")))]
    tokenizer = train_tokenizer(texts, "bpe", cfg.vocab_size)
    torch.manual_seed(0)
    encoder = TextEncoder(GPT(cfg).eval(), cfg, tokenizer)
    queries = sample_questions(args.text_queries)
    lengths = [len(ids) for ids in encoder.tokenize(queries)]
    print(f"\nend to end: {len(queries)} sample questions one at a time ({np.median(lengths):.0f} tokens median, "
          f"{max(lengths)} max), {args.shape} GPT float32, k=10\n")
    print("| index | embed p50 ms | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    encoder.embed_queries(queries[:1])
    for name, index in indexes.items():
        embed_t, total_t = [], []
        for text in queries:
            t0 = time.perf_counter()
            vector = encoder.embed_queries([text])
            t1 = time.perf_counter()
            search_one(index, vector, 10)
            total_t.append(time.perf_counter() - t0)
            embed_t.append(t1 - t0)
        p50, p99 = np.percentile(np.array(total_t) * 1e3, [50, 99])
        print(f"| {name} | {np.median(embed_t) * 1e3:.2f} | {p50:.2f} | {p99:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=list(SHAPES))
    ap.add_argument("--docs", type=int, default=300, help="sample documents to embed")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000, help="random query vectors of the search-only table")
    ap.add_argument("--text-queries", type=int, default=200, help="questions embedded end to end")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "latency"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "throughput" not in args.skip:
        throughput(args)
    if "latency" not in args.skip:
        latency(args)


if __name__ == "__main__":
    main()
