"""``pilelm export RUN --format gguf -o MODEL.gguf``: a run as one GGUF file for llama.cpp
(and everything built on it: llama-cpp-python, ollama, LM Studio), written with the ``gguf``
package (llama.cpp's own writer).

The stage knows no model family: the family's ``ModelSpec.gguf_adapter`` names a module
(``interop/gguf_gpt.py``) with ``gguf_refusal``, ``gguf_arch``, ``gguf_hparams`` and
``gguf_tensors``. Whatever llama.cpp cannot express is refused by name before the file is
opened. The tokenizer goes in as llama.cpp's byte-level BPE (``tokenizer.ggml.model = gpt2``,
GPT-2's split regex ``tokenizer.ggml.pre = gpt-2``): tokens, merges, token types, bos = eos =
the end-of-document token, no BOS added (pilelm adds none), the chat template if the run has one.

Tensor types (``gguf_type``): matrices in F16 (default), BF16, F32 or Q8_0 (blocks of 32
weights with one F16 scale, llama.cpp's ``quantize_row_q8_0``, via ``gguf.quants``); vectors
(norm gains, biases) always F32, as llama.cpp's converter writes them. A matrix whose rows are
not a multiple of 32 stays F16 under Q8_0. Smaller k-quants (Q4_K, ...) are llama.cpp's
``llama-quantize`` of the F16 file (``benchmarks/gguf_llamacpp.py`` does it through
llama-cpp-python).
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pilelm.core.atomic import atomic_path
from pilelm.models import families, get_spec, spec_for

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "f32", "q8_0")
"""Tensor types of the matrices a GGUF export can hold."""


def gguf_adapter_of(cfg: Any) -> Any:
    """The GGUF adapter module of a model config; refuses a family without one."""
    spec = spec_for(cfg)
    if not spec.gguf_adapter:
        with_gguf = [f for f in families() if get_spec(f).gguf_adapter]
        raise ValueError(f"a {spec.family} model has no llama.cpp form (GGUF export covers the "
                         f"{', '.join(with_gguf)} family); use --format hf")
    return importlib.import_module(spec.gguf_adapter)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_metadata(tok: Any, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's tokenizer keys for a byte-level BPE ``PileTokenizer``, the token list padded
    to the model's ``n_vocab`` rows (pilelm rounds the vocabulary up to a multiple of 64) with
    unused ``[PAD{id}]`` entries, as llama.cpp's converter pads."""
    import gguf

    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_gpt2_byte_level(spec.get("pre_tokenizer")):
        raise ValueError(f"the tokenizer is {tok.kind} ({model.get('type')}, pre-tokenizer "
                         f"{(spec.get('pre_tokenizer') or {}).get('type')}); GGUF export writes byte-level BPE "
                         "tokenizers with GPT-2's split (pilelm tokenizer train --kind bpe, GPT-2, Pythia)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges,
                            "token_types": types, "add_bos_token": False, "add_eos_token": False}
    if tok.eod_id is not None:
        meta["bos_token_id"] = meta["eos_token_id"] = tok.eod_id  # GPT-2 / NeoX: bos = eos = <|endoftext|>
    if tok.pad_id is not None:
        meta["padding_token_id"] = tok.pad_id
    if tok.chat_template:
        meta["chat_template"] = tok.chat_template
    return meta


def _is_gpt2_byte_level(pre: dict[str, Any] | None) -> bool:
    """A ByteLevel pre-tokenizer with GPT-2's regex and no prefix space (alone, or as the only
    step of a Sequence)."""
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
        and not pre.get("add_prefix_space", False)


# ---------------------------------------------------------------------------------------------
# Tensors


def encode_tensor(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array, GGML type) of one tensor: vectors F32, matrices in ``gguf_type`` (Q8_0 falls back
    to F16 where a row is not a whole number of 32-weight blocks)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = t.detach().float().contiguous().numpy()
    if a.ndim == 1 or gguf_type == "f32":
        return a, Q.F32
    if gguf_type == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    if gguf_type == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), Q.F16


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _add_value(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def write_gguf(path: str | Path, model: torch.nn.Module, cfg: Any, tok: Any, gguf_type: str = "f16",
               name: str = "") -> dict[str, Any]:
    """Write ``model`` (config ``cfg``) and its tokenizer ``tok`` as one GGUF file at ``path``
    (atomically); returns {architecture, tensors, parameters}. Refuses what llama.cpp cannot
    run before opening the file."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    adapter = gguf_adapter_of(cfg)
    refusal = adapter.gguf_refusal(cfg)
    if refusal:
        raise ValueError(f"cannot write this model as GGUF: {refusal}")
    arch = adapter.gguf_arch(cfg)
    tensors = adapter.gguf_tensors(cfg, dict(model.state_dict()))
    vocab_rows = tensors["token_embd.weight"].size(0)
    tok_meta = tokenizer_metadata(tok, vocab_rows)  # refuses before anything is written
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or arch)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type])))
        for suffix, value in adapter.gguf_hparams(cfg).items():
            _add_value(writer, f"{arch}.{suffix}", value)
        writer.add_vocab_size(vocab_rows)
        writer.add_tokenizer_model(tok_meta["model"])
        writer.add_tokenizer_pre(tok_meta["pre"])
        writer.add_token_list(tok_meta["tokens"])
        writer.add_token_merges(tok_meta["merges"])
        writer.add_token_types(tok_meta["token_types"])
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            if key in tok_meta:
                _add_value(writer, f"tokenizer.ggml.{key}", int(tok_meta[key]))
        writer.add_add_bos_token(tok_meta["add_bos_token"])
        writer.add_add_eos_token(tok_meta["add_eos_token"])
        if "chat_template" in tok_meta:
            writer.add_chat_template(tok_meta["chat_template"])
        for tensor_name, t in tensors.items():
            data, qtype = encode_tensor(t, gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    n_params = sum(t.numel() for t in tensors.values())
    return {"architecture": arch, "tensors": len(tensors), "parameters": n_params}


def run_export_gguf(run: str, output: str, step: int | None, gguf_type: str) -> Path:
    """The ``--format gguf`` branch of ``pilelm export``: the run's weights (plain, not a
    compressed run's) and tokenizer in one file."""
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference, resolve_checkpoint, stored_weight_formats

    formats = stored_weight_formats(resolve_checkpoint(run, step)[1])
    if formats:
        raise ValueError(f"{run} holds {', '.join(formats)} weights (a compressed run); export the run it was "
                         "made from with --gguf-type q8_0 (or quantize the F16 file with llama.cpp's llama-quantize)")
    model, model_cfg, tok_dir = load_for_inference(run, step)
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; --format gguf writes one file: -o {out / 'model.gguf'}")
    info = write_gguf(out, model, model_cfg, load_tokenizer(tok_dir, fast=False), gguf_type, Path(run).name)
    log.info("exported %s (llama.cpp %s, %d tensors, %d parameters, %s) to %s", run, info["architecture"],
             info["tensors"], info["parameters"], gguf_type, out)
    return out
