"""The privacy table: a non-private run and DP-SGD runs at epsilon 8 and 3 on the bundled sample,
side by side: test bits per byte, training tokens/s, and the exposure of canaries planted 1, 10
and 100 times (next to never-planted references).

    python benchmarks/privacy_table.py -o runs/privacy_table                 # the full table
    python benchmarks/privacy_table.py -o runs/privacy_quick --steps 150     # a shorter one

Steps: ``pilelm prepare`` of the sample with ``privacy.canaries=N`` -> a BPE tokenizer ->
tokenize -> three ``pilelm train`` runs started together (same model, data order, steps and
expected batch; each on ``--threads`` threads, so they share the machine's load alike) ->
``pilelm eval`` on the test split -> ``pilelm audit`` of each. Prints the table with ratios to
the non-private run and writes it to ``OUT/privacy_table.md``. Finished stages are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "pilelm" / "sample"
RUNS = {"non-private": [], "DP, epsilon 8": ["privacy.target_epsilon=8"], "DP, epsilon 3": ["privacy.target_epsilon=3"]}


def pilelm(*args: str, background: bool = False) -> subprocess.Popen | None:
    cmd = [sys.executable, "-m", "pilelm", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return None


def done(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/privacy_table"))
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of every run")
    ap.add_argument("--micro-batch", type=int, default=16, help="(expected) windows per step")
    ap.add_argument("--canaries", type=int, default=4, help="canaries per repetition count")
    ap.add_argument("--candidates", type=int, default=1000, help="random secrets per canary in the audit")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each training run")
    args = ap.parse_args()
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    prep, tok, shards = out / "prepared", out / "tokenizer", out / "shards"
    if not done(prep):
        pilelm("prepare", str(SAMPLE / "train"), str(SAMPLE / "val.jsonl.zst"), str(SAMPLE / "test.jsonl.zst"),
               "-o", str(prep), "--overwrite", f"privacy.canaries={args.canaries}")
    if not done(tok):
        pilelm("tokenizer", "train", str(prep), "-o", str(tok), "--kind", "bpe", "--vocab-size", "2048")
    if not done(shards):
        pilelm("tokenize", str(prep), "--tokenizer", str(tok), "-o", str(shards))
    common = ["--data", str(shards), "--config", "tiny", f"loop.max_steps={args.steps}",
              f"loop.micro_batch={args.micro_batch}", "loop.eval_every=0", "loop.tensorboard=false",
              f"loop.save_every={args.steps}", f"loop.num_threads={args.threads}", "loop.precision=fp32"]
    procs = []
    for i, (name, extra) in enumerate(RUNS.items()):
        run = out / f"run{i}"
        if not done(run):
            private = ["privacy.enabled=true", *extra] if extra else []
            procs.append((name, pilelm("train", "-o", str(run), *common, *private, background=True)))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"training {name} failed")
    runs = [out / f"run{i}" for i in range(len(RUNS))]
    if not done(out / "eval"):
        pilelm("eval", *map(str, runs), "--data", str(shards), "-o", str(out / "eval"))
    for i, run in enumerate(runs):
        if not done(out / f"audit{i}"):
            pilelm("audit", str(run), "--canaries", str(prep / "canaries.json"), "-o", str(out / f"audit{i}"),
                   f"candidates={args.candidates}", "pii_originals=50")
    print_table(out, runs, args)


def print_table(out: Path, runs: list[Path], args: argparse.Namespace) -> None:
    evals = json.loads((out / "eval" / "results.json").read_text())
    bpb = {name: r["overall"]["bpb"] for name, r in evals["runs"].items()}
    rows = []
    for i, (name, run) in enumerate(zip(RUNS, runs, strict=True)):
        manifest = json.loads((run / "manifest.json").read_text())
        audit = json.loads((out / f"audit{i}" / "results.json").read_text())
        groups = {g["repetitions"]: g for g in audit["groups"]}
        privacy = manifest["extra"].get("privacy")
        rows.append({"name": name, "epsilon": privacy["epsilon"] if privacy else None,
                     "sigma": privacy["noise_multiplier"] if privacy else None,
                     "bpb": bpb[run.name], "tps": manifest["extra"]["tokens_per_s"],
                     "exposure": {k: g["exposure"] for k, g in groups.items()},
                     "extracted": {k: g["extracted"] for k, g in groups.items()},
                     "pii": f"{audit['pii']['completed']}/{audit['pii']['tried']}"})
    base = rows[0]
    reps = sorted(base["exposure"])
    head = ["run", "epsilon", "noise mult.", "test BPB", "BPB / non-private", "tokens/s", "tokens/s ratio",
            *[("exposure, never planted" if r == 0 else f"exposure x{r}") for r in reps], "extracted x100",
            "scrubbed PII completed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
                 "-" if r["sigma"] is None else f"{r['sigma']:.3g}", f"{r['bpb']:.3f}",
                 f"{r['bpb'] / base['bpb']:.2f}", f"{r['tps']:,.0f}", f"{r['tps'] / base['tps']:.2f}",
                 *[f"{r['exposure'][k]:.1f}" for k in reps],
                 f"{r['extracted'].get(max(reps), 0)}/{args.canaries}", r["pii"]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    note = (f"\n{args.steps} steps x {args.micro_batch} windows of 128 tokens, tiny GPT-2 (2 layers, d=64), "
            f"{args.canaries} canaries per repetition count, exposure in bits among {args.candidates} random "
            "secrets (extrapolated, max 26.6).\n")
    (out / "privacy_table.md").write_text(table + "\n" + note)
    print(table + "\n" + note)


if __name__ == "__main__":
    main()
