"""Serving under load: a burst of concurrent requests vs the same one at a time, and requests
arriving staggered while others decode, with static vs continuous batching.

Starts ``pilelm serve`` as a subprocess on 127.0.0.1 (a free port) for a run directory
(``--run``; default: a randomly initialised 4-layer GPT-2 with the tests' tiny tokenizer, built
in a temporary directory). Burst: sends ``--requests`` streaming completions at once, then the
same requests one after another, and prints latency percentiles and aggregate tokens/s for
both and their ratio. Staggered (``--interval-ms`` > 0): the same requests start one every
``--interval-ms``, so most arrive while others decode; run against a continuous-batching server
and a ``--no-continuous`` (static batching) one, side by side. Each request has its own seed,
so every pass generates the same tokens. Ratios, no timed pass/fail: everything is bounded by
``--timeout`` seconds per pass, loopback only.

    .venv/bin/python benchmarks/serve_load.py [--run RUN_DIR] [--requests 64] [--max-tokens 64]
        [--interval-ms 50]

Exit status 1 if any request failed or did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The history of", "In mathematics, a", "The following code", "Once upon a time",
    "The court held that", "Abstract: We study", "def main():", "The patient was",
]


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    latency: float = 0.0
    first_token: float = 0.0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_run(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_run  # the tests' tiny tokenizer + a model of the size asked

    return make_tiny_run(tmp / "run", n_layer=4, n_head=4, d_model=256, block_size=256)


async def one(client: httpx.AsyncClient, body: dict) -> Result:
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                if "error" in msg:
                    return Result(False, error=msg["error"]["message"])
                if msg["choices"] and msg["choices"][0]["text"] and not first:
                    first = time.perf_counter() - t0
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
            if not done:
                return Result(False, error="stream ended without [DONE]")
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    return Result(True, tokens, time.perf_counter() - t0, first)


async def run_pass(url: str, bodies: list[dict], concurrent: bool, timeout: float,
                   interval: float = 0.0) -> tuple[list[Result], float]:
    """Send ``bodies``: all at once (concurrent), one after another, or (interval > 0) each
    starting ``interval`` seconds after the one before, whatever is still running."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        async with asyncio.timeout(timeout):
            if interval > 0:
                tasks = []
                for i, b in enumerate(bodies):
                    await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
                    tasks.append(asyncio.create_task(one(client, b)))
                results = list(await asyncio.gather(*tasks))
            elif concurrent:
                results = list(await asyncio.gather(*(one(client, b) for b in bodies)))
            else:
                results = [await one(client, b) for b in bodies]
        return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


HEADER = ("| mode       | ok      | tokens | wall s  | tok/s    | p50 s  | p90 s  | p99 s  | TTFT50 | TTFT90 |\n"
          "|------------|---------|--------|---------|----------|--------|--------|--------|--------|--------|")


@dataclass
class Summary:
    rate: float
    latency50: float
    ttft50: float
    ttft90: float


def report(name: str, results: list[Result], wall: float) -> Summary:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    rate = tokens / wall
    lat = [r.latency for r in ok] or [0.0]
    ttft = [r.first_token for r in ok] or [0.0]
    print(f"| {name:<10} | {len(ok):>3}/{len(results):<3} | {tokens:>6} | {wall:>7.2f} | {rate:>8.1f} | "
          f"{pct(lat, 50):>6.2f} | {pct(lat, 90):>6.2f} | {pct(lat, 99):>6.2f} | {pct(ttft, 50):>6.2f} | "
          f"{pct(ttft, 90):>6.2f} |")
    return Summary(rate, pct(lat, 50), pct(ttft, 50), pct(ttft, 90))


@contextmanager
def serve_process(run: Path, options: list[str], quiet: bool = False
                  ) -> Iterator[tuple[str, dict, subprocess.Popen]]:
    """``pilelm serve RUN OPTIONS`` on a free loopback port (stderr dropped when ``quiet``);
    yields (url, /health, the server process) once it answers, and stops it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "pilelm", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           *options, "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "PILELM_API_KEY"}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL if quiet else None)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        yield url, health, server
    finally:
        server.terminate()
        server.wait(30)


@contextmanager
def serving(run: Path, args: argparse.Namespace, continuous: bool) -> Iterator[tuple[str, dict]]:
    """``pilelm serve`` on a free loopback port; yields (url, /health) once it answers."""
    options = ["--max-batch", str(args.max_batch), "--batch-window-ms", str(args.batch_window_ms),
               "--max-concurrent", str(max(args.requests, 1)), "--continuous", str(continuous).lower(),
               "--device", args.device, "--dtype", args.dtype]
    with serve_process(run, options) as (url, health, _):
        yield url, health


def engine_stats(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()["engine"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory to serve (default: a random 4-layer d=256 GPT-2)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--batch-window-ms", type=float, default=20.0)
    ap.add_argument("--interval-ms", type=float, default=50.0,
                    help="staggered pass: one request every this many ms (0 = no staggered pass)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per pass")
    args = ap.parse_args()

    bodies = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": args.temperature,
         "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        for i in range(args.requests)
    ]
    interval = args.interval_ms / 1000
    staggered: dict[str, tuple[list[Result], float, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else default_run(Path(tmp))
        for continuous in ([False, True] if interval > 0 else [True]):
            mode = "continuous" if continuous else "static"
            with serving(run, args, continuous) as (url, health):
                asyncio.run(run_pass(url, bodies[:2], concurrent=False, timeout=args.timeout))  # warm-up
                if interval > 0:
                    before = engine_stats(url)
                    res, wall = asyncio.run(run_pass(url, bodies, False, args.timeout, interval=interval))
                    after = engine_stats(url)
                    staggered[mode] = (res, wall, {k: after[k] - before[k] for k in ("batches", "admissions")})
                if continuous:
                    conc, conc_wall = asyncio.run(run_pass(url, bodies, concurrent=True, timeout=args.timeout))
                    seq, seq_wall = asyncio.run(run_pass(url, bodies, concurrent=False, timeout=args.timeout))
                    burst_engine = engine_stats(url)

    print(f"model {health['model']} (context {health['limits']['context']}), device {args.device}, {args.dtype}; "
          f"{args.requests} streaming requests x {args.max_tokens} max tokens, max_batch {args.max_batch}")
    print("\nburst: all requests at once, then one at a time (continuous batching)")
    print(HEADER)
    c = report("concurrent", conc, conc_wall)
    s = report("sequential", seq, seq_wall)
    print(f"aggregate tokens/s, concurrent / sequential: {c.rate / s.rate:.1f}x (issue #6 asks >= 3x); "
          f"engine: {burst_engine['batches']} batches, largest {burst_engine['largest_batch']} rows")
    failed = [r for r in conc + seq if not r.ok]
    if staggered:
        print(f"\nstaggered: one request every {args.interval_ms:g} ms, static vs continuous batching")
        print(HEADER)
        summary = {mode: report(mode, res, wall) for mode, (res, wall, _) in staggered.items()}
        st, co = summary["static"], summary["continuous"]
        print(f"continuous / static: TTFT50 {co.ttft50 / st.ttft50:.2f}x, TTFT90 {co.ttft90 / st.ttft90:.2f}x, "
              f"p50 latency {co.latency50 / st.latency50:.2f}x, tokens/s {co.rate / st.rate:.2f}x; "
              "engine batches / admissions: " + ", ".join(
                  f"{mode} {d['batches']} / {d['admissions']}" for mode, (_, _, d) in staggered.items()))
        failed += [r for res, _, _ in staggered.values() for r in res if not r.ok]
    for r in failed[:5]:
        print("failed:", r.error, file=sys.stderr)
    counts = [sorted(r.tokens for r in res) for res in [conc, seq, *(v[0] for v in staggered.values())]]
    if any(c != counts[0] for c in counts):
        print("note: the passes generated different token counts", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
