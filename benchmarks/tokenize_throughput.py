"""Tokenization throughput on ../shared/minipile, side by side in one run on the same cores.

    .venv/bin/python benchmarks/tokenize_throughput.py [--vocab-size 8192] [--repeats 3]

Compares, on the same text and the same byte-level BPE (trained here by `pilelm tokenizer
train` on minipile's train split; training time is not part of any figure):

- pilelm tokenize, end to end: read the .jsonl.zst, parse, encode, write .bin/.idx + sidecars
  (on ``--workers`` cores), with the encoder it picks (gigatoken: one process, its threads),
  with fastokens (likewise) and with tiktoken (worker processes); each run in a fresh process,
  as the CLI runs (the process start and imports are not timed);
- the floor, in memory (texts already decoded, nothing written): the fastest of gigatoken
  (``encode_batch``, its own ``--workers`` threads) and fastokens (``encode_batch_flat``, likewise),
  each with a fresh tokenizer each run as a tokenize run has, tiktoken built from the same ranks
  (``encode_ordinary_batch``, one thread per core) and ``tokenizers``' ``encode_batch``;
- gigatoken reading the ``.jsonl.zst`` files itself (``encode_files(JsonlFileSource)``: it
  decompresses each whole file into memory and parses the JSON in Rust): what handing it whole
  files would give, ids only (no components, byte counts or resumable position);
- the input side alone: read, decompress, cut into batches and parse the JSON in one process
  (what pilelm does besides encoding and writing), with pilelm's own functions;
- the tutorial recipe: ``datasets.load_dataset("json")`` then ``.map(tokenizer, batched=True,
  num_proc=2)`` writing Arrow (map alone, and load + map).

Throughput is MB of UTF-8 text (10^6 bytes) per wall-clock second; each contender runs
``--repeats`` times (the slow ones ``--slow-repeats`` times), interleaved; the table gives each
one's best run and, since the machine may be shared, the median over repeats of the ratio
between runs made back to back; the last column is text per CPU-second of all the processes
and threads a contender used (immune to other load, blind to parallel efficiency).
It also checks that the shards hold exactly the ids ``tokenizers`` gives for every document,
and prints where pilelm's CPU time goes: each phase alone (decompress, cut into batches, parse
the JSON, encode in pilelm's batches, load + prove the tokenizer) in CPU-seconds per MB.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilelm.core.manifest import write_manifest  # noqa: E402
from pilelm.data.decompress import open_decompressed  # noqa: E402
from pilelm.data.prepared import parse_record  # noqa: E402
from pilelm.tokens.encode import iter_line_batches, parse_lines  # noqa: E402
from pilelm.tokens.shards import open_split  # noqa: E402
from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize  # noqa: E402
from pilelm.tokens.tokenizer import load_tokenizer  # noqa: E402
from pilelm.tokens.tokenizer_train import TokenizerTrainConfig, iter_split_texts, run_tokenizer_train  # noqa: E402


def prepared_view(minipile: Path, work: Path) -> Path:
    """minipile as a prepared dir (links, no copy): train/NN.jsonl.zst and val/val.jsonl.zst."""
    prep = work / "prep"
    (prep / "train").mkdir(parents=True)
    (prep / "val").mkdir()
    for f in sorted((minipile / "train").glob("*.jsonl.zst")):
        (prep / "train" / f.name).symlink_to(f.resolve())
    (prep / "val" / "val.jsonl.zst").symlink_to((minipile / "val.jsonl.zst").resolve())
    write_manifest(prep, "prepare", {"note": "minipile as it is, for the benchmark"})
    return prep


def best_of(times: list[float]) -> float:
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "minipile")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokenizer", type=Path, help="a byte-level BPE tokenizer dir to use instead of training one")
    ap.add_argument("--repeats", type=int, default=7, help="runs of pilelm and tiktoken")
    ap.add_argument("--slow-repeats", type=int, default=2, help="runs of tokenizers and datasets")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-datasets", action="store_true", help="leave out the datasets recipe")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    work = Path(tempfile.mkdtemp(prefix="pilelm_tokbench_"))
    # Encoder proofs are remembered in a cache of this run's own: the first pilelm run probes
    # (as a user's first run with a tokenizer does), the later ones find the proof.
    os.environ["PILELM_CACHE_DIR"] = str(work / "cache")
    try:
        prep = prepared_view(args.data, work)
        t = time.perf_counter()
        if args.tokenizer is not None:
            tok_dir = args.tokenizer
        else:
            tok_dir = run_tokenizer_train(TokenizerTrainConfig(data=prep, output=work / "tok", kind="bpe",
                                                               vocab_size=args.vocab_size))
            print(f"trained byte-level BPE, vocab {args.vocab_size}, in {time.perf_counter() - t:.1f} s")
        tok = load_tokenizer(tok_dir)
        assert tok.backend == "gigatoken", f"the fastest encoder did not engage: {tok.passed_over}"
        files = {s: sorted((prep / s).glob("*.jsonl.zst")) for s in ("train", "val")}
        texts = [t for s in ("train", "val") for t, _ in iter_split_texts(files[s])]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {mb:.2f} MB of text; {os.cpu_count()} CPUs; "
              f"pilelm workers={args.workers}")

        import tiktoken
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        fast = load_tokenizer(tok_dir, encoder="tiktoken").encoder.fast  # type: ignore[attr-defined]
        enc = tiktoken.Encoding("bench", pat_str=fast.encoding._pat_str,
                                mergeable_ranks=fast.encoding._mergeable_ranks,
                                special_tokens=fast.encoding._special_tokens)
        all_files = files["train"] + files["val"]
        # The Rust encoders read their thread counts once per process: each in-memory one runs
        # in a process of its own with --workers threads.
        rust = {name: RustInMemory(name, tok_dir / "tokenizer.json", all_files, args.workers)
                for name in ("gigatoken", "fastokens", "gigatoken_files")}

        batch_bytes = TokenizeConfig.batch_bytes

        def read_and_parse() -> None:
            for b in iter_line_batches(all_files, batch_bytes):
                parse_lines(b.data, b.first_line, "")

        names = ("pilelm", "pilelm_fastokens", "pilelm_tiktoken", "gigatoken", "fastokens", "gigatoken_files",
                 "tiktoken", "tokenizers", "read_parse", "datasets_map", "datasets_all")
        times: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}

        def timed(name: str, fn) -> None:
            t, c = time.perf_counter(), cpu_seconds()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(cpu_seconds() - c)

        def fresh(name: str, cfg: TokenizeConfig) -> None:
            wall, used = in_fresh_process(cfg)
            times[name].append(wall)
            cpu[name].append(used)

        for r in range(args.repeats):
            out = work / f"shards{r}"
            if r > 1:
                shutil.rmtree(work / f"shards{r - 1}")
            for other in ("shards_tiktoken", "shards_fastokens"):
                shutil.rmtree(work / other, ignore_errors=True)
            fresh("pilelm", TokenizeConfig(data=prep, tokenizer=tok_dir, output=out, workers=args.workers))
            for name, proc in rust.items():
                wall, used = proc.run()
                times[name].append(wall)
                cpu[name].append(used)
            fresh("pilelm_fastokens", TokenizeConfig(data=prep, tokenizer=tok_dir, output=work / "shards_fastokens",
                                                     workers=args.workers, encoder="fastokens"))
            fresh("pilelm_tiktoken", TokenizeConfig(data=prep, tokenizer=tok_dir, output=work / "shards_tiktoken",
                                                    workers=args.workers, encoder="tiktoken"))
            timed("tiktoken", lambda: enc.encode_ordinary_batch(texts, num_threads=args.workers))
            timed("read_parse", read_and_parse)
            if r >= args.slow_repeats:  # tokenizers and datasets take minutes; fewer runs
                continue
            timed("tokenizers", lambda: hf.encode_batch(texts, add_special_tokens=False))
            if not args.skip_datasets:
                d_map, d_all, d_cpu = datasets_recipe(files, tok_dir, work / f"hf{r}")
                times["datasets_map"].append(d_map)
                times["datasets_all"].append(d_all)
                cpu["datasets_map"].append(d_cpu)

        # Correctness: every document of val and train, ids as tokenizers gives them.
        for split in ("val", "train"):
            ts = open_split(work / "shards0", split)
            split_texts = [t for t, _ in iter_split_texts(files[split])]
            ref = hf.encode_batch(split_texts, add_special_tokens=False)
            bad = sum(not np.array_equal(ts.dataset[i][:-1], e.ids) for i, e in enumerate(ref))
            print(f"{split}: {len(ref)} documents, {bad} differ from tokenizers' ids")

        rate = {k: mb / best_of(v) for k, v in times.items() if v}
        # The machine may be shared: besides best against best, the median over repeats of
        # the ratio within a repeat (contenders run back to back, under the same load).
        paired = {k: float(np.median([b / a for a, b in zip(times["pilelm"], v, strict=False)]))
                  for k, v in times.items() if v}
        floor_name = max((k for k in ("gigatoken", "fastokens", "tiktoken", "tokenizers") if k in rate),
                         key=lambda k: rate[k])
        print()
        print(f"| contender (runs interleaved: {args.repeats} of the fast ones, {args.slow_repeats} of "
              "the others) | best MB/s | pilelm / it, best | "
              "pilelm / it, median of paired runs | MB per CPU-second |")
        print("|---|---:|---:|---:|---:|")
        labels = {
            "pilelm": f"pilelm tokenize, end to end (gigatoken, 1 process, {args.workers} threads)",
            "pilelm_fastokens": f"pilelm tokenize encoder=fastokens, end to end (1 process, {args.workers} threads)",
            "pilelm_tiktoken": f"pilelm tokenize encoder=tiktoken, end to end ({args.workers} processes)",
            "gigatoken": f"gigatoken encode_batch, in memory ({args.workers} threads)",
            "fastokens": f"fastokens encode_batch_flat, in memory ({args.workers} threads)",
            "gigatoken_files": f"gigatoken encode_files on the .jsonl.zst, ids only ({args.workers} threads)",
            "tiktoken": f"tiktoken encode_ordinary_batch, in memory ({args.workers} threads)",
            "read_parse": "read + decompress + parse JSON only, 1 process",
            "tokenizers": "tokenizers encode_batch, in memory",
            "datasets_map": "datasets .map(num_proc=2) -> Arrow",
            "datasets_all": "datasets load_dataset(json) + .map(num_proc=2)",
        }
        for k, v in rate.items():
            per_cpu = f"{mb / min(cpu[k]):.2f}" if cpu[k] else "-"
            print(f"| {labels[k]} | {v:.2f} | {rate['pilelm'] / v:.2f}x | {paired[k]:.2f}x | {per_cpu} |")
        print()
        print(f"pilelm / floor ({floor_name}): {rate['pilelm'] / rate[floor_name]:.2f}x best, "
              f"{paired[floor_name]:.2f}x median paired (target >= 0.5)")
        for other in ("pilelm_fastokens", "pilelm_tiktoken"):
            print(f"pilelm (gigatoken) / {other}, end to end: {rate['pilelm'] / rate[other]:.2f}x "
                  f"best, {paired[other]:.2f}x median paired")
        print(f"input side alone (read + decompress + parse, 1 process): {rate['read_parse']:.1f} MB/s; "
              f"CPU-seconds per MB: pilelm {min(cpu['pilelm']) / mb:.4f}, gigatoken in memory "
              f"{min(cpu['gigatoken']) / mb:.4f}, input side {min(cpu['read_parse']) / mb:.4f}")
        phases(all_files, tok_dir, mb, batch_bytes, min(cpu["pilelm"]))
        if "datasets_map" in rate:
            print(f"pilelm / datasets map: {rate['pilelm'] / rate['datasets_map']:.2f}x best, "
                  f"{paired['datasets_map']:.2f}x median paired (target >= 3)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for proc in rust.values():
            proc.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class RustInMemory:
    """A Rust encoder in a process of its own (``threads`` threads: each reads its thread
    count once per process), timed on request."""

    def __init__(self, name: str, tokenizer_json: Path, files: list[Path], threads: int):
        import multiprocessing

        self.conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_rust_in_memory, args=(child, name, str(tokenizer_json), files, threads), daemon=True)
        self.proc.start()

    def run(self) -> tuple[float, float]:
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(False)
        self.proc.join()


def _rust_in_memory(conn, name: str, tokenizer_json: str, files: list[Path], threads: int) -> None:
    """On each request, encode all texts (or, for ``gigatoken_files``, the files) with a fresh
    tokenizer (its caches cold, as a tokenize run starts) and send (wall s, CPU s) back."""
    os.environ["RAYON_NUM_THREADS"] = os.environ["FASTOKENS_BPE_THREADS"] = str(threads)
    import fastokens
    import gigatoken

    texts = [t for t, _ in iter_split_texts(files)]
    while conn.recv():
        if name == "fastokens":
            fk = fastokens.Tokenizer.from_file(tokenizer_json)
            t, c = time.perf_counter(), time.process_time()
            fk.encode_batch_flat(texts, add_special_tokens=False)
        else:
            gt = gigatoken.Tokenizer.from_json(Path(tokenizer_json).read_text())
            t, c = time.perf_counter(), time.process_time()
            if name == "gigatoken":
                gt.encode_batch(texts, parallel=True)
            else:
                gt.encode_files(gigatoken.JsonlFileSource([str(f) for f in files]), parallel=True)
        conn.send((time.perf_counter() - t, time.process_time() - c))


def in_fresh_process(cfg: TokenizeConfig) -> tuple[float, float]:
    """Run ``pilelm tokenize`` in a fresh process, as the CLI does (fastokens sizes its thread
    pool once per process; worker pools fork only beside no native threads): (wall s, CPU s
    of that process and its workers), the process start and imports not included."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tokenize_and_report, args=(child, cfg))
    proc.start()
    wall, used = parent.recv()
    proc.join()
    return wall, used


def _tokenize_and_report(conn, cfg: TokenizeConfig) -> None:
    logging.basicConfig(level=logging.WARNING)
    t, c = time.perf_counter(), cpu_seconds()
    run_tokenize(cfg)
    conn.send((time.perf_counter() - t, cpu_seconds() - c))


def phases(files: list[Path], tok_dir: Path, mb: float, batch_bytes: int, pilelm_cpu: float, runs: int = 3) -> None:
    """Where pilelm's CPU time goes: each phase alone, in this process (best of ``runs``)."""
    import gigatoken

    from pilelm.tokens.identity import tokenizer_fingerprint

    def best(fn) -> float:
        used = []
        for _ in range(runs):
            c = time.process_time()
            fn()
            used.append(time.process_time() - c)
        return min(used)

    def decompress() -> None:
        for f in files:
            with open_decompressed(f, "zst") as s:
                while s.read(batch_bytes):
                    pass

    batches = list(iter_line_batches(files, batch_bytes))
    parsed = [parse_lines(b.data, b.first_line, "") for b in batches]

    def encode() -> None:  # a fresh tokenizer, as each run starts
        gt = gigatoken.Tokenizer.from_json((tok_dir / "tokenizer.json").read_text())
        for p in parsed:
            gt.encode_batch(p.texts, parallel=True)

    def json_std() -> None:
        for b in batches:
            for line in b.data.split(b"\n")[:-1]:
                if line.strip():
                    parse_record(line)

    rows = {"decompress (zstandard)": best(decompress),
            "cut into batches of lines": best(lambda: list(iter_line_batches(files, batch_bytes))),
            "parse JSON (orjson, pilelm's parse_lines)": best(lambda: [parse_lines(b.data, b.first_line, "")
                                                                        for b in batches]),
            "encode (gigatoken, pilelm's batches, fresh tokenizer)": best(encode),
            "load + prove the tokenizer, fingerprint (fixed)": best(lambda: tokenizer_fingerprint(load_tokenizer(tok_dir))),
            }
    rows["cut into batches of lines"] -= rows["decompress (zstandard)"]
    print()
    print(f"| where pilelm's CPU goes (each phase alone, best of {runs}) | CPU-s per MB |")
    print("|---|---:|")
    for name, used in rows.items():
        print(f"| {name} | {used / mb:.4f} |")
    print(f"| sum of the phases | {sum(rows.values()) / mb:.4f} |")
    print(f"| pilelm tokenize, end to end (best run) | {pilelm_cpu / mb:.4f} |")
    print(f"| rest: arrays, writing + fsync, queues, thread hand-offs | {(pilelm_cpu - sum(rows.values())) / mb:.4f} |")
    print(f"(for comparison, parsing with the standard json module: {best(json_std) / mb:.4f} CPU-s per MB)")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def datasets_recipe(files: dict[str, list[Path]], tok_dir: Path, cache: Path) -> tuple[float, float, float]:
    """The Hugging Face tutorial recipe; returns (map seconds, load + map seconds, map CPU seconds)."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    data_files = {s: [str(f) for f in fs] for s, fs in files.items()}
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data_files, cache_dir=str(cache))
    t1, c1 = time.perf_counter(), cpu_seconds()
    ds.map(lambda batch: hf_tok(batch["text"]), batched=True, num_proc=2, remove_columns=["text", "meta"])
    t2, c2 = time.perf_counter(), cpu_seconds()
    shutil.rmtree(cache, ignore_errors=True)
    return t2 - t1, t2 - t0, c2 - c1


if __name__ == "__main__":
    main()
