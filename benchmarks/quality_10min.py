"""Quality per compute: bits per byte on held-out minipile after the same wall-clock (or steps).

Recipes, all on the same data (../shared/minipile's train split through the default
``pilelm prepare``, an 8192-token BPE trained on it) and scored on the same windows of
minipile's val split (prepared with the quality filters off, so every recipe and data policy
is scored on the same text; ``--eval-windows`` windows of 256 tokens spread evenly over the
split, so every component is in them; bits per byte = summed NLL / ln 2 / UTF-8 bytes of the
predicted tokens, through one scoring function):

- ``hf-trainer``: transformers ``Trainer`` + ``GPT2LMHeadModel`` (6 layers, d=384, 6 heads,
  context 256, batch 16, dropout 0, bf16 where native; AdamW lr 1e-3, betas 0.9/0.95,
  weight decay 0.1, warmup then cosine over the number of steps a timing probe predicts for
  the budget, stopped by a callback when the budget is spent);
- ``nanogpt``: nanoGPT's ``train.py`` recipe as a pilelm config (same shape, AdamW lr 6e-4,
  cosine to 10 %, unfused loss);
- ``cpu-bench``: ``pilelm train --config cpu-bench``;
- ``cpu-10min``: ``pilelm train --config cpu-10min``.

Every pilelm recipe gets ``loop.max_minutes`` (so its schedule spans the budget) or, with
``--steps``, ``loop.max_steps`` (equal-step comparisons). On a shared, busy machine wall-clock
budgets are unfair (another job's load lands on whichever recipe runs then):
``--cpu-minutes M`` budgets M minutes of this process's CPU time instead (all threads: on an
idle 2-core machine 20 CPU-minutes are 10 minutes), through the trainer's clock; with
``--threads 1`` (no thread spins waiting for a descheduled sibling, which burns CPU time
without work under load). ``--ablate``
trains cpu-10min with one lever changed at a time and prints each lever's BPB delta;
``--policy`` also trains cpu-10min on data prepared with the web rules for every component
(the old default) to show what the data policy does to quality. Data, runs and results are
cached in ``--work-dir`` (rerun to resume; finished recipes are not retrained).

    python benchmarks/quality_10min.py [--minutes 10 | --steps N] [--recipes a,b] [--ablate] [--policy]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pilelm.core.config import load_config
from pilelm.core.manifest import MANIFEST
from pilelm.core.runner import run_stage
from pilelm.core.stages import resolve_config_path
from pilelm.training.loader import ByteCounter

ROOT = Path(__file__).resolve().parents[1]
MINIPILE = ROOT.parent / "shared" / "minipile"
VOCAB = 8192
CONTEXT = 256  # scoring windows; every recipe's block_size is at least this
SHAPE = {"n_layer": 6, "n_head": 6, "d_model": 384, "block_size": CONTEXT}
RECIPES = ["hf-trainer", "nanogpt", "cpu-bench", "cpu-10min"]
NO_FILTERS = {"gopher_quality": [], "gopher_repetition": [], "c4": [], "light": []}
WEB_EVERYWHERE = {"gopher_quality": ["*"], "gopher_repetition": ["*"], "c4": ["Pile-CC"], "light": []}

VOCAB_KEY = "vocabulary"  # a lever that retokenizes the data rather than overriding a config section

# Each lever of cpu-10min and the override that takes it away (or adds one it left out).
LEVERS: dict[str, dict[str, Any]] = {
    "muon -> adamw": {"optim": {"name": "adamw", "lr": 1e-3}},
    "wsd -> cosine": {"schedule": {"kind": "cosine"}},
    "qk_norm off": {"model": {"qk_norm": False, "qk_norm_gain": False}},
    "swiglu -> relu2": {"model": {"mlp": "relu2"}},
    "swiglu -> gelu": {"model": {"mlp": "gelu"}},
    "rmsnorm -> layernorm": {"model": {"norm": "layernorm"}},
    "qk-norm gains off": {"model": {"qk_norm_gain": False}},
    # The recipe before it took Qwen3's form (exportable): LayerNorm, GELU, parameter-free QK-norm.
    "the form before Qwen3's": {"model": {"norm": "layernorm", "mlp": "gelu", "qk_norm_gain": False}},
    "logit softcap 15 on": {"model": {"logit_softcap": 15.0}},
    "z-loss 1e-4 on": {"model": {"z_loss": 1e-4}},
    "tied -> untied head": {"model": {"tie_embeddings": False}},
    "rope -> learned positions": {"model": {"arch": "gpt2"}},
    "document windows -> stride": {"loop": {"window_start": "stride"}},
    "ema 0.99 on": {"loop": {"ema": 0.99}},
    "lr x2": {"optim": {"lr": 6e-3, "muon_lr": 0.04}},
    "lr x0.5": {"optim": {"lr": 1.5e-3, "muon_lr": 0.01}},
    "weight decay 0.1 on": {"optim": {"weight_decay": 0.1}},
    "seq-len warmup 0.3 on": {"loop": {"seq_len_warmup": 0.3}},
    "seq-len warmup 0.3 + weight decay 0.1": {"loop": {"seq_len_warmup": 0.3}, "optim": {"weight_decay": 0.1}},
    "another seed (noise)": {"loop": {"seed": 1338}},
    # Data levers: another BPE vocabulary (the output projection's cost against bytes per token).
    "vocabulary 8192 -> 4096": {VOCAB_KEY: 4096},
    "vocabulary 8192 -> 16384": {VOCAB_KEY: 16384},
}

log = logging.getLogger("quality_10min")


def build_data(work: Path, minipile: Path, policy: str = "default", vocab: int = VOCAB) -> tuple[Path, Path]:
    """(train shards, val shards): minipile train -> prepare -> BPE -> tokenize, and minipile val
    prepared without quality filters, tokenized with the same tokenizer (cached)."""
    filters = {} if policy == "default" else WEB_EVERYWHERE
    tag = "" if vocab == VOCAB else f"-{vocab}"
    prep = run_stage("prepare", inputs=[str(minipile / "train")], output=str(work / f"prepared-{policy}"),
                     filters=filters)
    tok = run_stage("tokenizer train", data=str(work / "prepared-default" if policy != "default" else prep),
                    output=str(work / f"tokenizer{tag}"), kind="bpe", vocab_size=vocab)
    shards = run_stage("tokenize", data=str(prep), tokenizer=str(tok), output=str(work / f"shards-{policy}{tag}"))
    val_prep = run_stage("prepare", inputs=[str(minipile / "val.jsonl.zst")], output=str(work / "val-prepared"),
                         filters=NO_FILTERS, dedup={"exact": False, "minhash": False})
    val = run_stage("tokenize", data=str(val_prep), tokenizer=str(tok), output=str(work / f"val-shards{tag}"))
    return shards, val


# --- scoring --------------------------------------------------------------------------------


@torch.no_grad()
def score(model: torch.nn.Module, val_shards: Path, windows: int) -> float:
    """Bits per byte of ``model`` (a pilelm GPT) on ``windows`` val windows spread evenly over
    the split (every recipe the same windows); ``windows=0``: every window of the split (the
    same text whatever the tokenizer, for comparing vocabularies)."""
    from pilelm.tokens.shards import open_split

    split = open_split(val_shards, "val")
    tokens = split.dataset.tokens
    counter = ByteCounter(np.asarray(split.dataset.sizes), np.asarray(split.nbytes))
    total = (len(tokens) - 1) // CONTEXT
    starts = np.unique(np.linspace(0, total - 1, min(windows or total, total)).astype(np.int64)) * CONTEXT
    model.eval()
    nll, nbytes = 0.0, 0.0
    for i in range(0, len(starts), 16):
        rows = torch.from_numpy(np.stack([tokens[s : s + CONTEXT + 1] for s in starts[i : i + 16]]).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            _, loss = model(x, y, return_logits=False)
        nll += float(loss) * y.numel()
        s = starts[i : i + 16]
        nbytes += float((counter.offset(s + CONTEXT + 1) - counter.offset(s + 1)).sum())
    return nll / math.log(2) / nbytes


def _bf16() -> bool:
    from pilelm.models.dtypes import bf16_native

    return bf16_native(torch.device("cpu"))


# --- recipes --------------------------------------------------------------------------------


def budget_overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.steps:
        return {"max_steps": args.steps, "max_minutes": 0.0}
    return {"max_steps": 10**7, "max_minutes": args.cpu_minutes or args.minutes}


def clock(args: argparse.Namespace):
    """The budget's clock: wall time, or this process's CPU time (--cpu-minutes)."""
    return time.process_time if args.cpu_minutes else time.perf_counter


def pilelm_recipe(name: str, shards: Path, out: Path, args: argparse.Namespace,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from pilelm.training.checkpoint import load_for_inference
    from pilelm.training.trainer import TrainConfig, Trainer

    over: dict[str, Any] = {"data": str(shards), "output": str(out)}
    if name == "nanogpt":
        path = None
        over |= {"model": {"arch": "gpt2", "vocab_size": 0, "dropout": 0.0, **SHAPE},
                 "optim": {"name": "adamw", "lr": 6e-4, "beta2": 0.95, "weight_decay": 0.1},
                 "schedule": {"kind": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1},
                 "loop": {"micro_batch": 16, "fused_loss": False}}
    else:
        path = resolve_config_path(name)
    loop = {"num_threads": args.threads, "eval_every": 0, "save_every": 200, "tensorboard": False, "log_every": 10, **budget_overrides(args)}
    over["loop"] = {**over.get("loop", {}), **loop}
    for section, values in (extra or {}).items():
        over[section] = {**over.get(section, {}), **values}
    cfg = load_config(TrainConfig, path, overrides=over)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.clock = clock(args)
    trainer.fit()
    wall = time.perf_counter() - t0
    manifest = json.loads((out / MANIFEST).read_text())
    model, _, _ = load_for_inference(out)
    return {"steps": manifest["counts"]["steps"], "tokens": manifest["counts"]["tokens"],
            "train_minutes": manifest["timings"].get("budget_elapsed", manifest["timings"]["train"]) / 60,
            "wall_minutes": wall / 60, "model": model}


def hf_recipe(shards: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """transformers' Trainer recipe; the trained GPT2LMHeadModel is converted to a pilelm GPT
    (exactly: ``pilelm.interop``) for scoring."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from pilelm.interop.gpt2_neox import gpt_config_from_hf, gpt_from_hf
    from pilelm.models.gpt import GPT
    from pilelm.tokens.shards import open_split
    from pilelm.training.loader import BatchLoader

    transformers.logging.set_verbosity_error()
    cached = out / "pilelm_model.safetensors"
    if cached.is_file():  # trained before: the converted model and its figures
        from safetensors.torch import load_file

        saved = json.loads((out / "result.json").read_text())
        ours = GPT(gpt_config_from_hf(saved.pop("hf_config")))
        ours.load_state_dict(load_file(str(cached)), strict=False)
        return {**saved, "model": ours}
    tokens = open_split(shards, "train").dataset.tokens
    loader = BatchLoader(tokens, CONTEXT, 16, 1, seed=1337)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 10**8

        def __getitem__(self, g):
            x = loader.batch(g, 1)["input_ids"][0]
            return {"input_ids": x, "labels": x}

    torch.manual_seed(1337)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=SHAPE["d_model"], n_layer=SHAPE["n_layer"],
                        n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    now = clock(args)
    minutes = args.cpu_minutes or args.minutes
    steps = args.steps or _probe_steps(model, loader, minutes, now)
    started: list[float] = []

    class Budget(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            started or started.append(now())

        def on_step_end(self, a, state, control, **kw):
            if not args.steps and now() - started[0] >= 60 * minutes:
                control.should_training_stop = True

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-3,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=min(100, max(1, steps // 10)), bf16=_bf16(), use_cpu=True, logging_steps=50,
        save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=1337)
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Budget()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(10**8))
    t0, c0 = time.perf_counter(), now()
    trainer.train()
    wall, spent = time.perf_counter() - t0, now() - c0
    done = trainer.state.global_step
    cfg = gpt_config_from_hf(model.config.to_dict())
    ours = GPT(cfg)
    ours.load_state_dict(gpt_from_hf(cfg, {k: v.float() for k, v in model.state_dict().items()}), strict=False)
    from safetensors.torch import save_file

    result = {"steps": done, "tokens": done * 16 * CONTEXT, "train_minutes": spent / 60, "wall_minutes": wall / 60,
              "planned_steps": steps}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items() if k != "lm_head.weight"}, str(cached))
    (out / "result.json").write_text(json.dumps({**result, "hf_config": model.config.to_dict()}))
    return {**result, "model": ours}


def _probe_steps(model: torch.nn.Module, loader, minutes: float, now) -> int:
    """Steps that fit in the budget, from the time of 3 steps after one warm-up step (the
    usual recipe needs a step count for its schedule)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for i in range(4):
        x = loader.batch(i * 16, 16)["input_ids"]
        t0 = now()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(now() - t0)
    model.load_state_dict(state)
    return max(10, int(60 * minutes / (sum(times[1:]) / 3)))


# --- the table ------------------------------------------------------------------------------


def train_and_score(key: str, work: Path, val: Path, args: argparse.Namespace, fn,
                    full: bool = False) -> dict[str, Any]:
    """One result, cached as JSON under ``work/results``; ``full``: also ``bpb_full``, the BPB on
    every window of the val split (a pilelm recipe's run is reloaded for it if need be)."""
    from pilelm.training.checkpoint import load_for_inference

    budget, slug = budget_name(args), key.replace(" ", "_").replace(">", "")
    path = work / "results" / f"{slug}-{budget}.json"
    run = work / "runs" / budget / slug
    if path.is_file():
        res = json.loads(path.read_text())
        model = load_for_inference(run)[0] if full and "bpb_full" not in res else None
    else:
        res = fn(run)
        model = res.pop("model")
        res["bpb"] = score(model, val, args.eval_windows)
        res["recipe"] = key
    if model is not None and full:
        res["bpb_full"] = score(model, val, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return res


def budget_name(args: argparse.Namespace) -> str:
    if args.steps:
        return f"{args.steps}steps"
    return f"{args.cpu_minutes:g}cpumin" if args.cpu_minutes else f"{args.minutes:g}min"


def print_table(title: str, results: list[dict[str, Any]], base: str) -> None:
    ref = next((r["bpb"] for r in results if r["recipe"] == base), None)
    print(f"\n{title}\n")
    print(f"| recipe | steps | tokens (M) | budget min | val BPB | vs {base} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        rel = f"{100 * (r['bpb'] / ref - 1):+.1f} %" if ref else ""
        print(f"| {r['recipe']} | {r['steps']} | {r['tokens'] / 1e6:.2f} | {r['train_minutes']:.2f} | "
              f"{r['bpb']:.3f} | {rel} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per recipe")
    ap.add_argument("--steps", type=int, default=0, help="equal-step budget instead of minutes")
    ap.add_argument("--cpu-minutes", type=float, default=0.0,
                    help="budget of process CPU minutes (all threads) instead of wall-clock minutes")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--ablate", action="store_true", help="cpu-10min with one lever changed at a time")
    ap.add_argument("--levers", default="", help="comma-separated subset of the ablation levers")
    ap.add_argument("--skip-base", action="store_true",
                    help="with --ablate: do not train cpu-10min itself (another process does; its cached result is "
                         "used when present), so two --threads 1 processes can split the levers")
    ap.add_argument("--policy", action="store_true", help="also cpu-10min on data prepared with web rules everywhere")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--eval-windows", type=int, default=200, help="val windows of 256 tokens to score")
    ap.add_argument("--minipile", type=Path, default=MINIPILE)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quality_10min")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.minipile.is_dir():
        raise SystemExit(f"minipile not found at {args.minipile} (--minipile PATH)")
    work = args.work_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    shards, val = build_data(work, args.minipile)
    if args.prepare_only:
        return
    results = []
    for name in [r for r in args.recipes.split(",") if r]:
        if name == "hf-trainer":
            results.append(train_and_score(name, work, val, args, lambda out: hf_recipe(shards, out, args)))
        else:
            results.append(train_and_score(name, work, val, args,
                                           lambda out, n=name: pilelm_recipe(n, shards, out, args)))
    budget = {"steps": f"{args.steps} steps each", "cpumin": f"{args.cpu_minutes:g} CPU-minutes each",
              "min": f"{args.minutes:g} minutes each"}[budget_name(args).lstrip("0123456789.")]
    print_table(f"Quality per compute ({budget}; val BPB on {args.eval_windows} windows of {CONTEXT} tokens)",
                results, "hf-trainer")
    if args.policy:
        web, _ = build_data(work, args.minipile, policy="web-everywhere")
        pol = [train_and_score("cpu-10min", work, val, args, lambda out: pilelm_recipe("cpu-10min", shards, out, args)),
               train_and_score("cpu-10min on web-rules-everywhere data", work, val, args,
                               lambda out: pilelm_recipe("cpu-10min", web, out, args))]
        print_table("Data policy (cpu-10min)", pol, "cpu-10min")
    if args.ablate:
        chosen = [x for x in args.levers.split(",") if x] or list(LEVERS)
        vocab_levers = [lv for lv in chosen if VOCAB_KEY in LEVERS[lv]]
        base_fn = lambda out: pilelm_recipe("cpu-10min", shards, out, args)  # noqa: E731
        cached = work / "results" / f"cpu-10min-{budget_name(args)}.json"
        rows = [] if args.skip_base and not cached.is_file() else [
            train_and_score("cpu-10min", work, val, args, base_fn, full=bool(vocab_levers))]
        for lever in chosen:
            over = dict(LEVERS[lever])
            lever_shards, lever_val = (shards, val) if VOCAB_KEY not in over else build_data(
                work, args.minipile, vocab=over.pop(VOCAB_KEY))
            rows.append(train_and_score(
                f"cpu-10min, {lever}", work, lever_val, args,
                lambda out, s=lever_shards, o=over: pilelm_recipe("cpu-10min", s, out, args, o),
                full=VOCAB_KEY in LEVERS[lever]))
        print_table("Ablation: cpu-10min with one lever changed (positive = the lever helps)", rows, "cpu-10min")
        if vocab_levers:
            print("\nVocabulary levers on every window of the val split (the same text whatever the tokenizer):\n")
            for r in rows:
                if "bpb_full" in r:
                    print(f"| {r['recipe']} | {r['bpb_full']:.3f} |")


if __name__ == "__main__":
    main()
