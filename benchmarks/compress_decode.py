"""Decode speed of compressed models: pilelm's modes vs CTranslate2 on the same weights.

One randomly initialised GPT (shape is what decides speed; a random model's BPB says nothing,
so none is measured), compressed each way pilelm offers (bf16, int8-weight, int8-dynamic with
a bf16 and with an fp32 model, int4-weight g128, 50 % structured pruning alone and with
int8-dynamic), and the same weights
converted for CTranslate2 through pilelm's transformers export (float32 and int8; its CPU build
here has no bfloat16 or int16). Greedy decoding of random prompts in interleaved rounds
(A B C ..., A B C ...); tok/s = batch x new tokens / time, prompt prefill included, from the
best round; each mode's ratio to pilelm bf16 from the best rounds and as the median of the
per-round ratios (paired: load hits both alike). Last, the target lines: pilelm's best mode of
the same weights (not the pruned model) against CTranslate2's best at each batch size (>= 1.2x)
and int8-weight against bf16 at batch 1 (>= 1.5x). Writes only a temporary directory (printed).
Defaults take a few minutes on a quiet 2-core machine; on a loaded one, ``--threads 1 --clock
cpu`` times CPU time instead of the wall clock.

    .venv/bin/python benchmarks/compress_decode.py [--shape gpt2-124m|small] [--threads 2]
        [--prompt-len 32] [--new-tokens 128] [--batch-sizes 1 8] [--repeats 3] [--clock wall|cpu]
        [--ct2-types float32 int8] [--skip MODE...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from pilelm.compress.prune import structured_prune
from pilelm.compress.quantize import cast_unquantized, quantize_model
from pilelm.compress.report import greedy_decode, race_rounds
from pilelm.interop.gpt2_neox import gpt_hf_config, gpt_to_hf
from pilelm.models.gpt import GPT, GPTConfig

SHAPES = {
    "small": dict(n_layer=6, d_model=384, n_head=6, vocab_size=4096, block_size=256),
    "gpt2-124m": dict(n_layer=12, d_model=768, n_head=12, vocab_size=50304, block_size=1024),
}
PRUNED = "pruned-50% bf16"
PRUNED_Q = "pruned-50% int8-dynamic fp32"
CT2_TYPES = ["float32", "int8"]  # its CPU build here has no bfloat16 or int16


def pilelm_modes(base: GPT, pruned: bool = True) -> dict[str, GPT]:
    """pilelm's decode modes of ``base``: bf16, each quantization method and (``pruned``) the
    50 %-pruned model alone and with int8-dynamic."""
    modes = {"bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for method in ("int8-weight", "int8-dynamic", "int4-weight"):
        model = copy.deepcopy(base)
        quantize_model(model, method, group_size=128)
        cast_unquantized(model, torch.bfloat16)
        modes[method] = model
    # The dynamic kernel takes and gives fp32: an fp32 model saves two casts per linear layer.
    model = copy.deepcopy(base)
    quantize_model(model, "int8-dynamic")
    modes["int8-dynamic fp32"] = model
    if not pruned:
        return modes
    modes[PRUNED] = structured_prune(base, heads=0.5, channels=0.5).to(torch.bfloat16)
    pruned_q = structured_prune(base, heads=0.5, channels=0.5)
    quantize_model(pruned_q, "int8-dynamic")
    modes[PRUNED_Q] = pruned_q
    return modes


def ct2_models(base: GPT, cfg: GPTConfig, folder: Path, threads: int, types: list[str]) -> dict:
    """CTranslate2 generators of ``base`` (converted from a transformers export)."""
    import ctranslate2
    from tokenizers import Tokenizer, models

    hf_dir, ct2_dir = folder / "hf", folder / "ct2"
    hf_dir.mkdir()
    save_file(gpt_to_hf(cfg, base.state_dict()), str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(gpt_hf_config(cfg, 0, 0, "float32").to_json_string())
    # A word-level vocabulary "t0".."tN" so CTranslate2's converter finds one token per id.
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0")).save(
        str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t0", "unk_token": "t0"}))
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization="float32")
    return {f"ct2 {t}": ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=t, intra_threads=threads)
            for t in types}


def ct2_generate(generator, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    tokens = [[f"t{i}" for i in p] for p in prompts]
    res = generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                   include_prompt_in_result=False, end_token=[])
    return [r.sequences_ids[0] for r in res]


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of den_time / num_time: the speed of ``num`` relative to ``den``
    measured in the same rounds (so load hits both alike)."""
    return statistics.median(d / n for n, d in zip(num, den, strict=True))


def verdict(name: str, best: float, paired: float, target: float) -> str:
    met = "met" if min(best, paired) >= target else ("missed" if max(best, paired) < target else "borderline")
    return f"target {name} >= {target:.1f}x: {best:.2f}x best-of-rounds, {paired:.2f}x paired median -> {met}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2-124m", choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time the process's CPU time (robust to time-slicing on a loaded machine, with "
                         "--threads 1; with more threads it counts spinning workers too)")
    ap.add_argument("--ct2-types", nargs="+", default=CT2_TYPES, choices=CT2_TYPES)
    ap.add_argument("--skip", nargs="*", default=[], help="pilelm modes to leave out")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[args.shape])
    base = GPT(cfg).eval()
    ours = {k: v for k, v in pilelm_modes(base).items() if k not in args.skip}
    targets = []
    with tempfile.TemporaryDirectory(prefix="compress_decode_") as tmp:
        theirs = ct2_models(base, cfg, Path(tmp), args.threads, args.ct2_types)
        print(f"{args.shape} ({base.num_params(False) / 1e6:.0f}M, random weights), greedy, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, {args.threads} threads, torch {torch.__version__}, "
              f"{args.repeats} interleaved rounds, {args.clock} clock; load average {os.getloadavg()[0]:.2f}; CTranslate2 in {tmp}\n")
        print("| batch | mode | tok/s (best round) | vs pilelm bf16 (best) | vs pilelm bf16 (paired median) "
              "| same tokens as pilelm bf16 |")
        print("|---:|---|---:|---:|---:|---|")
        for bs in args.batch_sizes:
            gen = torch.Generator().manual_seed(bs)
            prompts = torch.randint(0, cfg.vocab_size, (bs, args.prompt_len), generator=gen).tolist()
            fns = {name: partial(greedy_decode, m, prompts, args.new_tokens) for name, m in ours.items()}
            fns |= {name: partial(ct2_generate, g, prompts, args.new_tokens) for name, g in theirs.items()}
            outputs = {}
            for name, fn in fns.items():  # warm up; keep the tokens for the comparison column
                outputs[name] = fn()
            rows = [list(r) for r in zip(*outputs["bf16"], strict=True)] if outputs["bf16"] else []
            times = dict(zip(fns, race_rounds(list(fns.values()), args.repeats, clock), strict=True))
            speed = {k: bs * args.new_tokens / min(t) for k, t in times.items()}
            for name in fns:
                out = outputs[name]
                got = [list(r) for r in zip(*out, strict=True)] if name in ours else [list(r) for r in out]
                same = sum(a == b for ra, rb in zip(got, rows, strict=True) for a, b in zip(ra, rb, strict=False))
                print(f"| {bs} | {name} | {speed[name]:.1f} | {speed[name] / speed['bf16']:.2f}x "
                      f"| {paired_ratio(times[name], times['bf16']):.2f}x | {same / (bs * args.new_tokens):.0%} |",
                      flush=True)
            # The engine comparison is on the same weights: the pruned model is another model.
            same_weights = [k for k in ours if k not in (PRUNED, PRUNED_Q)]
            best_ours = max(same_weights, key=lambda k: speed[k])
            best_ct2 = max(theirs, key=lambda k: speed[k])
            targets.append(verdict(f"batch {bs}: pilelm best ({best_ours}) vs CTranslate2 best ({best_ct2})",
                                   speed[best_ours] / speed[best_ct2],
                                   paired_ratio(times[best_ours], times[best_ct2]), 1.2))
            if bs == 1 and "int8-weight" in ours:
                targets.append(verdict("batch 1: int8-weight vs pilelm bf16", speed["int8-weight"] / speed["bf16"],
                                       paired_ratio(times["int8-weight"], times["bf16"]), 1.5))
    print()
    print("\n".join(targets))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
