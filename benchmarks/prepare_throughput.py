"""Throughput of `pilelm prepare` vs datatrove on the same data, side by side in one run.

Both run the equivalent steps on the train split of ../shared/minipile with the same number
of worker processes: JSON-lines reader -> Gopher quality filter -> MinHash-LSH dedup (5-gram
shingles, 14 bands x 8 rows, datatrove's defaults) -> writer. datatrove runs its four MinHash
stages (signatures, buckets, cluster, filter) after a filter stage that writes the kept
documents, as its examples do. pilelm also runs with all its default steps (normalisation,
Gopher quality + repetition, C4 rules for Pile-CC, PII, exact + MinHash dedup, decontamination
against val) on train + val.

Each run is a separate subprocess; its peak memory is the largest sum of RSS over its process
tree, sampled from /proc every 50 ms. MB are 10**6 bytes of document text.

    python benchmarks/prepare_throughput.py [--data ../shared/minipile] [--workers 2]

Needs the `bench` extra (datatrove, spacy, xxhash<4).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]


def text_megabytes(files: list[Path]) -> float:
    total = 0
    for p in files:
        with open(p, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
            for line in io.TextIOWrapper(r, encoding="utf-8"):
                total += len(json.loads(line)["text"].encode())
    return total / 1e6


def _tree_rss(pid: int) -> int:
    """Sum of RSS (bytes) of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def measure(args: list[str]) -> tuple[float, float, str]:
    """Run this script with ``args`` in a subprocess; (seconds, peak MB, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak / 1e6, out


# ---------------------------------------------------------------- the runs (in subprocesses)


def run_pilelm(data: Path, out: Path, workers: int, full: bool) -> None:
    from pilelm.core.config import load_config
    from pilelm.data.pipeline import PrepareConfig, run_prepare

    if full:
        over = {"inputs": [str(data)]}
    else:
        over = {
            "inputs": [str(data / "train")],
            "filters": {"gopher_quality_skip": [], "gopher_repetition": [], "c4": []},
            "pii": {"enabled": False},
            "dedup": {"exact": False},
            "decontam": {"enabled": False},
        }
    over.update(output=str(out), executor={"workers": workers})
    run_prepare(load_config(PrepareConfig, overrides=over))
    m = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"docs_out": m["counts"]["documents_out"], "timings": m["timings"]}))


def run_datatrove(data: Path, out: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    files = sorted((data / "train").glob("*.jsonl.zst"))
    cfg = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes
    logs = out / "logs"
    timings = {}

    def stage(name: str, pipeline: list, tasks: int) -> None:
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                              logging_dir=str(logs / name)).run()
        timings[name] = round(time.perf_counter() - t0, 2)

    stage("gopher", [JsonlReader(str(data / "train"), glob_pattern="*.jsonl.zst"), GopherQualityFilter(),
                     JsonlWriter(str(out / "filtered"))], len(files))
    stage("signatures", [JsonlReader(str(out / "filtered")),
                         MinhashDedupSignature(output_folder=str(out / "sigs"), config=cfg)], len(files))
    stage("buckets", [MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"),
                                          config=cfg)], cfg.num_buckets)
    stage("cluster", [MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"),
                                          config=cfg)], 1)
    stage("filter", [JsonlReader(str(out / "filtered")), MinhashDedupFilter(input_folder=str(out / "remove")),
                     JsonlWriter(str(out / "deduped"))], len(files))
    print(json.dumps({"timings": timings}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "minipile"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run", choices=["pilelm", "pilelm-full", "datatrove"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if args.run:
        out = Path(args.out)
        if args.run == "datatrove":
            run_datatrove(data, out, args.workers)
        else:
            run_pilelm(data, out, args.workers, full=args.run == "pilelm-full")
        return
    train_mb = text_megabytes(sorted((data / "train").glob("*.jsonl.zst")))
    all_mb = train_mb + text_megabytes(sorted(data.glob("*.jsonl.zst")))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        for name, mb, label in (("datatrove", train_mb, "datatrove 0.10.1: Gopher quality + MinHash (4 stages)"),
                                ("pilelm", train_mb, "pilelm prepare: Gopher quality + MinHash"),
                                ("pilelm-full", all_mb, "pilelm prepare: all default steps, train + val")):
            secs, peak, out = measure(["--run", name, "--out", str(tmp / name), "--data", str(data),
                                       "--workers", str(args.workers)])
            detail = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            rows.append((name, label, mb, secs, peak, detail))
            print(f"{label}: {secs:.1f} s, stage timings {detail.get('timings')}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][2] / rows[0][3]
    print(f"\nprepare throughput on {data} ({train_mb:.1f} MB train text), {args.workers} workers\n")
    print("| pipeline | MB of text | seconds | MB/s | vs datatrove | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for _, label, mb, secs, peak, _ in rows:
        print(f"| {label} | {mb:.1f} | {secs:.1f} | {mb / secs:.2f} | {mb / secs / base:.1f}x | {peak:.0f} |")


if __name__ == "__main__":
    main()
