"""The privacy table: a non-private run and DP-SGD runs at epsilon 8 and 3 on the bundled sample,
side by side: test bits per byte, training tokens/s, and the exposure of canaries planted 1, 10
and 100 times next to never-planted references (mean +/- standard deviation over the canaries
of each group).

    python benchmarks/privacy_table.py                          # the table: 4.5 min at load 3-6
    python benchmarks/privacy_table.py -o /tmp/pt --steps 400   # a shorter one (less memorized)

To memorize within a CPU budget the model reads the sample's train split several times:
every train document is cut to its first ``--doc-chars`` characters (at a line end; all 1015
documents and every component stay, about 0.34M tokens), so ``--steps`` 1000 x 16 windows is
about 6 epochs and a 10x canary is read about 60 times.

Steps: that train split + the sample's val and test -> ``pilelm prepare`` with
``privacy.canaries=N privacy.references=M`` -> a BPE tokenizer -> tokenize -> three ``pilelm train`` runs started
together (same tiny GPT-2, data, steps and expected batch; each on ``--threads`` threads, so
they share the machine's load alike) -> ``pilelm eval`` on the test split -> ``pilelm audit``
of each. Prints the table and the target lines (the non-private run memorizes; DP at
epsilon 8 against the never-planted canaries), also written to ``OUT/privacy_table.md``;
writes nothing outside OUT (default runs/privacy_table). Finished stages are reused; delete
OUT to measure again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import zstandard

from pilelm.data.prepared import encode_record, iter_records

SAMPLE = Path(__file__).resolve().parents[1] / "pilelm" / "sample"
RUNS = {"non-private": [], "DP, epsilon 8": ["privacy.target_epsilon=8"], "DP, epsilon 3": ["privacy.target_epsilon=3"]}
TARGET_RUN, TARGET_REPS = "DP, epsilon 8", 10


def pilelm(*args: str, env: dict[str, str], background: bool = False) -> subprocess.Popen | None:
    cmd = [sys.executable, "-m", "pilelm", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return None


def done(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def short_train_split(folder: Path, doc_chars: int) -> Path:
    """The sample's train documents, each cut to its first ``doc_chars`` characters at a line
    end (0 = whole), as one ``.jsonl.zst`` shard under ``folder/train``."""
    out = folder / "train" / "00.jsonl.zst"
    if out.is_file():
        return out.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as w:
        for path in sorted((SAMPLE / "train").glob("*.jsonl.zst")):
            for record in iter_records(path):
                text = record["text"]
                if doc_chars and len(text) > doc_chars:
                    cut = text.rfind("\n", 0, doc_chars)
                    text = text[: cut if cut > doc_chars // 2 else doc_chars]
                w.write(encode_record(text, record.get("meta") or {}))
    os.replace(tmp, out)
    return out.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/privacy_table"))
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    ap.add_argument("--micro-batch", type=int, default=16, help="(expected) windows per step")
    ap.add_argument("--doc-chars", type=int, default=1500,
                    help="train documents are cut to this many characters (0 = whole; more data, fewer epochs)")
    ap.add_argument("--canaries", type=int, default=8, help="canaries per repetition count")
    ap.add_argument("--references", type=int, default=32, help="never-planted canaries (the chance level)")
    ap.add_argument("--candidates", type=int, default=1000, help="random secrets per canary in the audit")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each process")
    args = ap.parse_args()
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    # Every child on --threads threads: torch's default (all cores) spins badly on a loaded machine.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    prep, tok, shards = out / "prepared", out / "tokenizer", out / "shards"
    if not done(prep):
        train = short_train_split(out / "input", args.doc_chars)
        pilelm("prepare", str(train), str(SAMPLE / "val.jsonl.zst"), str(SAMPLE / "test.jsonl.zst"),
               "-o", str(prep), "--overwrite", f"privacy.canaries={args.canaries}",
               f"privacy.references={args.references}", env=env)
    if not done(tok):
        pilelm("tokenizer", "train", str(prep), "-o", str(tok), "--kind", "bpe", "--vocab-size", "2048", env=env)
    if not done(shards):
        pilelm("tokenize", str(prep), "--tokenizer", str(tok), "-o", str(shards), env=env)
    common = ["--data", str(shards), "--config", "tiny", f"loop.max_steps={args.steps}",
              f"loop.micro_batch={args.micro_batch}", "loop.eval_every=0", "loop.tensorboard=false",
              f"loop.save_every={args.steps}", f"loop.num_threads={args.threads}", "loop.precision=fp32"]
    procs = []
    for i, (name, extra) in enumerate(RUNS.items()):
        run = out / f"run{i}"
        if not done(run):
            private = ["privacy.enabled=true", *extra] if extra else []
            procs.append((name, pilelm("train", "-o", str(run), *common, *private, env=env, background=True)))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"training {name} failed")
    runs = [out / f"run{i}" for i in range(len(RUNS))]
    if not done(out / "eval"):
        pilelm("eval", *map(str, runs), "--data", str(shards), "-o", str(out / "eval"), env=env)
    audits = []
    for i, run in enumerate(runs):
        if not done(out / f"audit{i}"):
            audits.append(pilelm("audit", str(run), "--canaries", str(prep / "canaries.json"),
                                 "-o", str(out / f"audit{i}"), f"candidates={args.candidates}", "pii_originals=50",
                                 env=env, background=True))
    if any(p.wait() != 0 for p in audits):
        raise SystemExit("an audit failed")
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print_table(out, runs, args, f"{time.perf_counter() - t0:.0f} s wall, {load}")


def print_table(out: Path, runs: list[Path], args: argparse.Namespace, timing: str) -> None:
    evals = json.loads((out / "eval" / "results.json").read_text())
    bpb = {name: r["overall"]["bpb"] for name, r in evals["runs"].items()}
    rows = []
    for i, (name, run) in enumerate(zip(RUNS, runs, strict=True)):
        manifest = json.loads((run / "manifest.json").read_text())
        audit = json.loads((out / f"audit{i}" / "results.json").read_text())
        groups = {g["repetitions"]: g for g in audit["groups"]}
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        privacy = manifest["extra"].get("privacy")
        rows.append({"name": name, "epsilon": privacy["epsilon"] if privacy else None,
                     "sigma": privacy["noise_multiplier"] if privacy else None, "epochs": last["epoch"],
                     "bpb": bpb[run.name], "tps": manifest["extra"]["tokens_per_s"], "groups": groups,
                     "pii": f"{audit['pii']['completed']}/{audit['pii']['tried']}"})
    base = rows[0]
    reps = sorted(base["groups"])
    head = ["run", "epsilon", "noise mult.", "test BPB", "BPB / non-private", "tokens/s", "tokens/s ratio",
            *[("exposure, never planted" if r == 0 else f"exposure x{r}") for r in reps],
            f"extracted x{max(reps)}", "scrubbed PII completed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
                 "-" if r["sigma"] is None else f"{r['sigma']:.3g}", f"{r['bpb']:.3f}",
                 f"{r['bpb'] / base['bpb']:.2f}", f"{r['tps']:,.0f}", f"{r['tps'] / base['tps']:.2f}",
                 *[f"{r['groups'][k]['exposure']:.1f} ± {r['groups'][k]['exposure_sd']:.1f}" for k in reps],
                 f"{r['groups'][max(reps)]['extracted']}/{args.canaries}", r["pii"]]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"{args.steps} steps x {args.micro_batch} windows of 128 tokens ({base['epochs']:.1f} epochs of the train "
            f"split, documents cut to {args.doc_chars} characters), tiny GPT-2 (2 layers, d=64), {args.canaries} "
            f"canaries per repetition count, {args.references} never planted; exposure in bits (mean ± sd over the canaries) among "
            f"{args.candidates} random secrets, extrapolated (at most 26.6). {timing}.")
    lines += ["", note, "", *target_lines(rows)]
    text = "\n".join(lines) + "\n"
    (out / "privacy_table.md").write_text(text)
    print(text)


def target_lines(rows: list[dict]) -> list[str]:
    """The targets: the non-private run memorizes (1x < 10x < 100x, 10x above the references)
    and DP at epsilon 8 brings the 10x canaries to the references' level within noise (the
    difference of the means under twice its standard error)."""
    def gap(r: dict, reps: int) -> tuple[float, float]:
        """Mean exposure of the ``reps`` group minus the references', and its standard error."""
        a, b = r["groups"][reps], r["groups"][0]
        return a["exposure"] - b["exposure"], math.sqrt(a["exposure_sd"] ** 2 / a["canaries"]
                                                        + b["exposure_sd"] ** 2 / b["canaries"])

    base, dp = rows[0], next(r for r in rows if r["name"] == TARGET_RUN)
    means = [g["exposure"] for k, g in sorted(base["groups"].items()) if k > 0]
    mem, mem_se = gap(base, TARGET_REPS)
    d, se = gap(dp, TARGET_REPS)
    return [f"target 1, non-private memorizes: exposure x1 < x10 < x100 = "
            f"{' < '.join(f'{m:.1f}' for m in means)}: {'met' if means == sorted(means) else 'NOT met'}; "
            f"x{TARGET_REPS} minus never planted = {mem:.1f} ± {mem_se:.1f} bits: "
            f"{'met' if mem > 2 * mem_se else 'NOT met'}",
            f"target 2, {TARGET_RUN} hides the x{TARGET_REPS} canaries: x{TARGET_REPS} minus never planted = "
            f"{d:.1f} ± {se:.1f} bits (within 2 standard errors: {'met' if abs(d) <= 2 * se else 'NOT met'}), "
            f"at {dp['bpb'] / base['bpb']:.2f}x the non-private test BPB"]


if __name__ == "__main__":
    main()
