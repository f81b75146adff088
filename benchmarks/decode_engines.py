"""Decode and prefill speed of the same weights in three engines: pilelm (each mode), llama.cpp
(F16, Q8_0, Q4_K_M GGUF files from ``pilelm export --format gguf``; llama-cpp-python) and
CTranslate2 (int8; through the transformers export, GPT-2 shape only: pilelm has no
transformers form of the QK-norm recipe yet).

Shapes: ``gpt2-124m`` (GPT-2 small: llama.cpp ``gpt2``) and ``cpu-10min`` (the recipe's
shape, pilelm/configs/cpu-10min.yaml, with a SwiGLU MLP: the form llama.cpp runs, as ``qwen3``;
vocabulary 4096 as the demo's tokenizer). Random weights (shape decides speed; greedy tokens
are compared only as a sanity column). pilelm's modes are ``compress_decode.pilelm_modes``
(bf16, int8-weight, int8-dynamic bf16 and fp32, int4-weight g128). Every engine decodes
greedily from the same prompts; rounds are interleaved (A B C ..., A B C ...) and tok/s comes
from the best round: decode = batch x new tokens / time with prompt prefill included (as
compress_decode.py); prefill = batch x prompt tokens / time of the prompt plus one token.
The summary compares like with like (16-bit, 8-bit, 4-bit) and the best of each engine.

    .venv/bin/python benchmarks/decode_engines.py [--shapes gpt2-124m cpu-10min] [--threads 2]
        [--batch-sizes 1 8] [--prompt-len 32] [--new-tokens 64] [--prefill-len 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from compress_decode import ct2_generate, ct2_models, paired_ratio, pilelm_modes  # benchmarks/

from pilelm.compress.report import greedy_decode, race_rounds
from pilelm.interop.gguf_export import write_gguf
from pilelm.models.gpt import GPT, GPTConfig

SHAPES = {
    "gpt2-124m": dict(arch="gpt2", n_layer=12, d_model=768, n_head=12, vocab_size=50304, block_size=1024),
    "cpu-10min": dict(arch="neox", n_layer=4, d_model=256, n_head=4, vocab_size=4096, block_size=256,
                      rotary_pct=1.0, parallel_residual=False, bias=False, tie_embeddings=True, qk_norm=True,
                      mlp="swiglu"),
}
CLASSES = {"16-bit": ("bf16", "llama.cpp F16"),
           "8-bit": ("int8-weight", "int8-dynamic", "int8-dynamic fp32", "llama.cpp Q8_0", "ct2 int8"),
           "4-bit": ("int4-weight", "llama.cpp Q4_K_M")}


class WordTokenizer:
    """A stand-in byte-level BPE for random-weight models: tokens "a", "b", "ab" (one merge),
    then ``t{i}`` (only the GGUF's token list needs it; the engines are fed ids)."""

    def __init__(self, vocab_size: int):
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"a": 0, "b": 1, "ab": 2} | {f"t{i}": i for i in range(3, vocab_size)}
        self.hf = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
        self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.kind, self.eod_id, self.pad_id, self.chat_template = "bpe", 0, None, None


class LlamaCpp:
    """A llama.cpp context over a GGUF file that decodes several sequences at once (one
    sequence id per prompt, separate KV cells), through llama-cpp-python's C API."""

    def __init__(self, path: Path, n_seq: int, seq_len: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = n_seq * seq_len
        params.n_batch = params.n_ctx
        params.n_ubatch = min(params.n_ctx, 512)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(params.n_ctx, 0, n_seq)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows (token, position, sequence, wants logits) in one llama_decode call."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of equal-length prompts: out[step][row], as pilelm's."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        P = len(prompts[0])
        self._decode([(t, i, s, i == P - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        nxt = [self._argmax(s * P + P - 1) for s in range(len(prompts))]
        steps = [nxt]
        for j in range(1, new_tokens):
            self._decode([(t, P + j - 1, s, True) for s, t in enumerate(nxt)])
            nxt = [self._argmax(s) for s in range(len(prompts))]
            steps.append(nxt)
        return steps

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def quantize_gguf(src: Path, dst: Path, ftype_name: str, threads: int) -> Path:
    """llama.cpp's llama-quantize of an F16 file (e.g. Q4_K_M)."""
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = threads
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype_name} failed")
    return dst


def llama_models(base: GPT, folder: Path, max_seq: int, args) -> dict[str, LlamaCpp]:
    tok = WordTokenizer(base.cfg.vocab_size)
    f16 = folder / "f16.gguf"
    write_gguf(f16, base, base.cfg, tok, "f16")
    files = {"F16": f16, "Q8_0": folder / "q8_0.gguf", "Q4_K_M": folder / "q4_k_m.gguf"}
    write_gguf(files["Q8_0"], base, base.cfg, tok, "q8_0")
    quantize_gguf(f16, files["Q4_K_M"], "Q4_K_M", args.threads)
    return {f"llama.cpp {k}": LlamaCpp(v, max(args.batch_sizes), max_seq, args.threads) for k, v in files.items()}


def engines(base: GPT, folder: Path, args) -> dict[str, tuple[str, object]]:
    """name -> (engine kind, model) for every engine and mode."""
    max_seq = max(args.prompt_len + args.new_tokens, args.prefill_len + 1)
    out: dict[str, tuple[str, object]] = {k: ("pilelm", m) for k, m in pilelm_modes(base, pruned=False).items()}
    out |= {k: ("llama.cpp", m) for k, m in llama_models(base, folder, max_seq, args).items()}
    if base.cfg.standard:
        (folder / "ct2").mkdir()
        out |= {k: ("ct2", m) for k, m in ct2_models(base, base.cfg, folder / "ct2", args.threads, ["int8"]).items()}
    return out


def generate_fn(kind: str, model, prompts: list[list[int]], new_tokens: int):
    if kind == "pilelm":
        return partial(greedy_decode, model, prompts, new_tokens)
    if kind == "llama.cpp":
        return partial(model.generate, prompts, new_tokens)
    return partial(ct2_generate, model, prompts, new_tokens)


def as_rows(kind: str, out: list[list[int]]) -> list[list[int]]:
    """Tokens per row (pilelm and LlamaCpp give them per step)."""
    return [list(r) for r in out] if kind == "ct2" else [list(r) for r in zip(*out, strict=True)]


def run_shape(shape: str, args) -> list[str]:
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[shape])
    base = GPT(cfg).eval()
    summary = []
    with tempfile.TemporaryDirectory(prefix="decode_engines_") as tmp:
        eng = engines(base, Path(tmp), args)
        print(f"\n{shape} ({base.num_params(False) / 1e6:.0f}M parameters, random weights), {args.threads} threads, "
              f"prompt {args.prompt_len} + {args.new_tokens} new tokens (decode), {args.prefill_len}-token prompts "
              f"(prefill), {args.repeats} interleaved rounds; load average {os.getloadavg()[0]:.1f}\n")
        print("| batch | engine / mode | decode tok/s | prefill tok/s | decode vs pilelm bf16 (paired) "
              "| same tokens as pilelm bf16 |")
        print("|---:|---|---:|---:|---:|---:|")
        for bs in args.batch_sizes:
            gen = torch.Generator().manual_seed(bs)
            prompts = torch.randint(0, cfg.vocab_size, (bs, args.prompt_len), generator=gen).tolist()
            long = torch.randint(0, cfg.vocab_size, (bs, args.prefill_len), generator=gen).tolist()
            decode = {k: generate_fn(kind, m, prompts, args.new_tokens) for k, (kind, m) in eng.items()}
            prefill = {k: generate_fn(kind, m, long, 1) for k, (kind, m) in eng.items()}
            outputs = {k: as_rows(eng[k][0], fn()) for k, fn in decode.items()}  # warm-up
            for fn in prefill.values():
                fn()
            names = list(decode)
            rounds = race_rounds([decode[k] for k in names] + [prefill[k] for k in names], args.repeats)
            times = dict(zip(names, rounds[: len(names)], strict=True))
            ptimes = dict(zip(names, rounds[len(names):], strict=True))
            speed = {k: bs * args.new_tokens / min(t) for k, t in times.items()}
            pspeed = {k: bs * args.prefill_len / min(t) for k, t in ptimes.items()}
            ref = outputs["bf16"]
            for k in names:
                same = sum(a == b for ra, rb in zip(outputs[k], ref, strict=True) for a, b in zip(ra, rb, strict=True))
                print(f"| {bs} | {k} | {speed[k]:.1f} | {pspeed[k]:.0f} | {paired_ratio(times[k], times['bf16']):.2f}x "
                      f"| {same / (bs * args.new_tokens):.0%} |", flush=True)
            summary += like_with_like(shape, bs, eng, speed, pspeed)
    return summary


def like_with_like(shape: str, bs: int, eng: dict, speed: dict, pspeed: dict) -> list[str]:
    lines = []
    for cls, members in CLASSES.items():
        present = [m for m in members if m in speed]
        ours = [m for m in present if eng[m][0] == "pilelm"]
        others = [m for m in present if eng[m][0] != "pilelm"]
        if ours and others:
            a, b = max(ours, key=speed.get), max(others, key=speed.get)
            lines.append(f"{shape} batch {bs} {cls}: pilelm {a} {speed[a]:.1f} tok/s vs {b} {speed[b]:.1f} "
                         f"-> {speed[a] / speed[b]:.2f}x (prefill {pspeed[a]:.0f} vs {pspeed[b]:.0f} tok/s)")
    best = {kind: max((k for k in speed if eng[k][0] == kind), key=speed.get) for kind in ("pilelm", "llama.cpp")}
    a, b = best["pilelm"], best["llama.cpp"]
    target = 1.0 if bs == 1 else 1.5
    lines.append(f"{shape} batch {bs} best of each: pilelm {a} {speed[a]:.1f} vs {b} {speed[b]:.1f} tok/s "
                 f"-> {speed[a] / speed[b]:.2f}x (target >= {target}x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}; CPU: "
          f"{os.cpu_count()} cores visible")
    summary = []
    for shape in args.shapes:
        summary += run_shape(shape, args)
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
