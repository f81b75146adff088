"""Decode speed of compressed models: pilelm's modes vs CTranslate2 on the same weights.

One randomly initialised GPT (shape is what decides speed), compressed each way pilelm offers
(bf16, int8-weight, int8-dynamic, int4-weight, 50 % structured pruning), and the same weights
converted for CTranslate2 through pilelm's transformers export (float32 and int8; its
CPU build here has no bfloat16 or int16). Greedy decoding of random prompts, interleaved rounds, the best of each kept;
tok/s = batch x new tokens / wall time, prompt prefill included. The table gives each mode's
ratio to pilelm bf16 and, last, pilelm's best mode against CTranslate2's best.

    .venv/bin/python benchmarks/compress_decode.py [--shape gpt2-124m|small] [--threads 2]
        [--prompt-len 32] [--new-tokens 128] [--batch-sizes 1 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from pilelm.compress.prune import structured_prune
from pilelm.compress.quantize import cast_unquantized, quantize_model
from pilelm.compress.report import greedy_decode, race
from pilelm.interop.gpt2_neox import gpt_hf_config, gpt_to_hf
from pilelm.models.gpt import GPT, GPTConfig

SHAPES = {
    "small": dict(n_layer=6, d_model=384, n_head=6, vocab_size=4096, block_size=256),
    "gpt2-124m": dict(n_layer=12, d_model=768, n_head=12, vocab_size=50304, block_size=1024),
}
CT2_TYPES = ["float32", "int8"]  # its CPU build here has no bfloat16 or int16


def pilelm_modes(base: GPT) -> dict[str, GPT]:
    modes = {"bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for method in ("int8-weight", "int8-dynamic", "int4-weight"):
        model = copy.deepcopy(base)
        quantize_model(model, method, group_size=128)
        cast_unquantized(model, torch.bfloat16)
        modes[method] = model
    modes["pruned-50% bf16"] = structured_prune(base, heads=0.5, channels=0.5).to(torch.bfloat16)
    return modes


def ct2_models(base: GPT, cfg: GPTConfig, folder: Path, threads: int) -> dict:
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
            for t in CT2_TYPES}


def ct2_generate(generator, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    tokens = [[f"t{i}" for i in p] for p in prompts]
    res = generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                   include_prompt_in_result=False, end_token=[])
    return [r.sequences_ids[0] for r in res]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2-124m", choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[args.shape])
    base = GPT(cfg).eval()
    ours = pilelm_modes(base)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = ct2_models(base, cfg, Path(tmp), args.threads)
        print(f"{args.shape} ({base.num_params(False) / 1e6:.0f}M), greedy, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, {args.threads} threads, torch {torch.__version__}\n")
        print("| batch | mode | tok/s | vs pilelm bf16 | same tokens as pilelm bf16 |")
        print("|---:|---|---:|---:|---|")
        for bs in args.batch_sizes:
            gen = torch.Generator().manual_seed(bs)
            prompts = torch.randint(0, cfg.vocab_size, (bs, args.prompt_len), generator=gen).tolist()
            fns = {name: partial(greedy_decode, m, prompts, args.new_tokens) for name, m in ours.items()}
            fns |= {name: partial(ct2_generate, g, prompts, args.new_tokens) for name, g in theirs.items()}
            outputs = {}
            for name, fn in fns.items():  # warm up; keep the tokens for the comparison column
                outputs[name] = fn()
            rows = [list(r) for r in zip(*outputs["bf16"], strict=True)] if outputs["bf16"] else []
            times = dict(zip(fns, race(list(fns.values()), args.repeats), strict=True))
            speed = {k: bs * args.new_tokens / t for k, t in times.items()}
            for name in fns:
                out = outputs[name]
                got = [list(r) for r in zip(*out, strict=True)] if name in ours else [list(r) for r in out]
                same = sum(a == b for ra, rb in zip(got, rows, strict=True) for a, b in zip(ra, rb, strict=False))
                print(f"| {bs} | {name} | {speed[name]:.1f} | {speed[name] / speed['bf16']:.2f}x "
                      f"| {same / (bs * args.new_tokens):.0%} |", flush=True)
            best_ours = max((k for k in ours), key=lambda k: speed[k])
            best_ct2 = max((k for k in theirs), key=lambda k: speed[k])
            print(f"| {bs} | **best: {best_ours} vs {best_ct2}** | | **{speed[best_ours] / speed[best_ct2]:.2f}x** | |",
                  flush=True)


if __name__ == "__main__":
    main()
