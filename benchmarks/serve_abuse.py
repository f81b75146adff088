"""A normal client's latency and the server's memory while abusive requests run (issue 29).

Starts ``pilelm serve`` on a free loopback port (the tiny default model of ``serve_load.py``
unless ``--run``), then runs a normal client (``--normal`` streaming completions of
``--max-tokens`` tokens, ``--normal-concurrency`` at a time) twice in the same run: alone (the
quiet baseline), and while abusers run beside it:

- poisoned floats: completions with ``temperature: 1e-40`` / ``repetition_penalty: 1e-40``
  (before the fix these failed every generation in the batch, the normal client's included);
- abandoned embeddings: requests of 2048 inputs whose client leaves after ``--abandon-s``
  (before, each pinned the embedding worker until all 2048 were embedded);
- big echo + logprobs: ``n: 64`` choices scoring a long prompt with 20 alternatives per token
  (before: megabytes of response each).

It prints the normal client's p50/p99 latency and failures in both phases, their ratio, the
server's peak RSS in each phase (sampled from /proc every 50 ms) and what the abusive requests
got (status counts). Bounded in count and time (``--timeout`` per phase), loopback only.

    .venv/bin/python benchmarks/serve_abuse.py [--run RUN_DIR] [--normal 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS, Result, default_run, one, pct, serve_process  # noqa: E402


class PeakRSS:
    """The largest resident set size of process ``pid`` seen while running (MiB)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def now(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def normal_client(url: str, args: argparse.Namespace) -> list[Result]:
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i,
               "stream": True, "stream_options": {"include_usage": True}} for i in range(args.normal)]
    sem = asyncio.Semaphore(args.normal_concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:

        async def limited(body: dict) -> Result:
            async with sem:
                return await one(client, body)

        return list(await asyncio.gather(*(limited(b) for b in bodies)))


async def abusers(url: str, args: argparse.Namespace, stop: asyncio.Event, statuses: collections.Counter) -> None:
    """Poisoned floats, abandoned big embeddings and big echo+logprobs, in a loop until ``stop``."""
    context = httpx.get(f"{url}/health", timeout=5).json()["limits"]["context"]
    long_prompt = list(range(1, context - 8))
    kinds = {
        "poisoned temperature": {"prompt": "x", "max_tokens": 16, "temperature": 1e-40},
        "poisoned penalty": {"prompt": "x", "max_tokens": 16, "repetition_penalty": 1e-40},
        "echo+logprobs n=64": {"prompt": long_prompt, "n": 64, "echo": True, "logprobs": 20, "max_tokens": 4},
    }

    async def post(client: httpx.AsyncClient, kind: str, path: str, body: dict, timeout: float | None) -> None:
        try:
            r = await client.post(path, json=body, timeout=timeout)
            statuses[(kind, r.status_code)] += 1
            statuses[(kind, "response MB")] += len(r.content) / 1e6
        except httpx.TimeoutException:
            statuses[(kind, "abandoned")] += 1

    async with httpx.AsyncClient(base_url=url) as client:
        while not stop.is_set():
            await asyncio.gather(
                *(post(client, kind, "/v1/completions", body, args.timeout) for kind, body in kinds.items()),
                post(client, "embeddings 2048 inputs", "/v1/embeddings",
                     {"input": [[1 + (i % 200)] * 7 for i in range(2048)]}, args.abandon_s),
            )
            await asyncio.sleep(0.05)


async def abuse_phase(url: str, args: argparse.Namespace, statuses: collections.Counter) -> list[Result]:
    stop = asyncio.Event()
    bad = asyncio.create_task(abusers(url, args, stop, statuses))
    await asyncio.sleep(0.5)  # the abuse is under way before the normal client starts
    try:
        return await normal_client(url, args)
    finally:
        stop.set()
        await bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory to serve (default: a random 4-layer d=256 GPT-2)")
    ap.add_argument("--normal", type=int, default=32, help="the normal client's requests per phase")
    ap.add_argument("--normal-concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--abandon-s", type=float, default=0.5, help="an embeddings abuser leaves after this long")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per phase")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else default_run(Path(tmp))
        with serve_process(run, [], quiet=True) as (url, health, server):
            asyncio.run(normal_client(url, argparse.Namespace(**{**vars(args), "normal": 2})))  # warm-up
            rss = PeakRSS(server.pid)
            start_rss = rss.now()
            with rss:
                quiet = asyncio.run(normal_client(url, args))
            quiet_peak = rss.peak
            statuses: collections.Counter = collections.Counter()
            with rss:
                abused = asyncio.run(abuse_phase(url, args, statuses))
            abused_peak = rss.peak
            after = httpx.get(f"{url}/health", timeout=10).json()

    print(f"model {health['model']} (context {health['limits']['context']}); normal client: {args.normal} streaming "
          f"requests x {args.max_tokens} tokens, {args.normal_concurrency} at a time; limits: max_request_work "
          f"{health['limits']['max_request_work']}, max_work_in_flight {health['limits']['max_work_in_flight']}")
    print("| phase  | normal ok | p50 s | p99 s | server peak RSS MiB |")
    print("|--------|-----------|-------|-------|---------------------|")
    rows = {}
    for name, res, peak in (("quiet", quiet, quiet_peak), ("abused", abused, abused_peak)):
        lat = [r.latency for r in res if r.ok] or [float("nan")]
        rows[name] = (pct(lat, 50), pct(lat, 99))
        print(f"| {name:<6} | {sum(r.ok for r in res):>4}/{len(res):<4} | {rows[name][0]:>5.2f} | {rows[name][1]:>5.2f} "
              f"| {peak:>19.0f} |")
    print(f"abused / quiet: p50 {rows['abused'][0] / rows['quiet'][0]:.2f}x, p99 {rows['abused'][1] / rows['quiet'][1]:.2f}x;"
          f" server RSS at start {start_rss:.0f} MiB")
    print("abusive requests:", json.dumps({f"{k} {s}": round(v, 2) if isinstance(v, float) else v
                                           for (k, s), v in sorted(statuses.items(), key=str)}))
    print(f"engine after: rows_failed {after['engine']['rows_failed']}, errors {after['engine']['errors']}, "
          f"active_requests {after['active_requests']}, work_in_flight {after['work_in_flight']}")
    failed = [r for r in quiet + abused if not r.ok]
    for r in failed[:5]:
        print("normal request failed:", r.error, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
