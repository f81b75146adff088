"""The GPT family (``pilelm.models.gpt``) as a llama.cpp GGUF model: which llama.cpp
architecture expresses a config, its hyperparameters and its tensors in GGUF names.

Three llama.cpp architectures cover the family (their graphs: llama.cpp ``src/models/``):

- ``arch=gpt2`` -> ``gpt2``: learned positions, pre-LayerNorm, fused qkv, tanh-GELU MLP,
  biases everywhere (a bias-free model gets zero biases), output tied or not.
- ``arch=neox`` -> ``gptneox``: rotary on the first ``rotary_dim`` dimensions in the
  rotate-half ("neox") layout, fused qkv with rows (q, k, v) as ours (transformers' per-head
  interleaving is what llama.cpp's converter undoes), parallel or sequential residual
  (``use_parallel_residual``), an output matrix always present. llama.cpp's GELU is the tanh
  approximation where GPT-NeoX uses the exact one (differences ~1e-3 in activations).
- ``qk_norm`` with rotary over the whole head, a SwiGLU MLP, no biases and a sequential
  residual -> ``qwen3``: RMSNorm blocks, per-head RMS QK-norm with a gain per head dimension,
  rotate-half rotary, separate q/k/v and gate/up/down matrices. A model whose block norms are
  LayerNorms (without bias) is written as an exactly equivalent RMSNorm model: every matrix
  that writes into the residual stream (token embedding, attention output, MLP down) is
  centred so each written vector has zero mean; then no LayerNorm has a mean to subtract and
  LayerNorm(x) = RMSNorm(x) with the same gain and epsilon (the "centre the writing weights"
  identity; Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits",
  and TransformerLens' ``center_writing_weights``). The output head keeps the uncentred
  embedding (so a tied model is written with a separate ``output.weight``). A parameter-free
  QK-norm is written with gains of 1; its epsilon becomes ``norm_eps`` (pilelm's is the
  dtype's: both are far below the per-head mean square).

Everything else is refused by name before anything is written (``gguf_refusal``): a logit
soft-cap, squared ReLU, QK-norm with a plain GELU MLP (no llama.cpp architecture has both),
partial rotary with QK-norm, pruned heads outside ``qwen3``.
"""

from __future__ import annotations

from typing import Any

import torch

from pilelm.models.gpt import GPTConfig


def _norm_kind(cfg: GPTConfig) -> str:
    return getattr(cfg, "norm", "layernorm")  # block norms; "rmsnorm" where the config has that option


def gguf_refusal(cfg: GPTConfig) -> str | None:
    """Why this config has no llama.cpp form (None: it has one); names the options to change."""
    if cfg.logit_softcap:
        return (f"model.logit_softcap={cfg.logit_softcap}: llama.cpp's gpt2 / gptneox / qwen3 graphs have no "
                "final soft-cap; export a model trained with model.logit_softcap=0")
    if cfg.mlp == "relu2":
        return ("model.mlp=relu2 (squared ReLU): no llama.cpp architecture that pilelm writes has it; "
                "train with model.mlp=gelu or model.mlp=swiglu")
    if cfg.qk_norm:
        if cfg.arch != "neox":
            return "model.qk_norm with learned positions (arch=gpt2): llama.cpp's gpt2 has no QK-norm; use arch=neox"
        wrong = {k: v for k, v in (("mlp", cfg.mlp if cfg.mlp != "swiglu" else None),
                                   ("rotary_pct", cfg.rotary_pct if cfg.rotary_pct != 1.0 else None),
                                   ("parallel_residual", cfg.parallel_residual or None),
                                   ("bias", cfg.bias or None)) if v is not None}
        if wrong:
            return (f"model.qk_norm=true with {wrong}: the llama.cpp architecture with per-head QK-norm and rotary "
                    "(qwen3) needs model.mlp=swiglu, model.rotary_pct=1.0, model.parallel_residual=false and "
                    "model.bias=false (no llama.cpp architecture has QK-norm with a plain GELU MLP)")
        return None
    if _norm_kind(cfg) != "layernorm":
        return (f"model.norm={_norm_kind(cfg)} without model.qk_norm: pilelm writes RMSNorm models as qwen3, which "
                "has QK-norm; train with model.qk_norm=true or model.norm=layernorm")
    if cfg.mlp != "gelu":
        return (f"model.mlp={cfg.mlp} without model.qk_norm: llama.cpp's gpt2 / gptneox have a GELU MLP; pilelm "
                "writes SwiGLU models as qwen3, which needs model.qk_norm=true")
    if cfg.attn_width != cfg.d_model:
        return (f"{cfg.n_head} heads of width {cfg.head_size} (pruned heads): llama.cpp's {gguf_arch(cfg)} needs "
                f"n_head * head size == d_model = {cfg.d_model}; prune MLP channels only (heads=0)")
    return None


def gguf_arch(cfg: GPTConfig) -> str:
    """The llama.cpp architecture name of a config that ``gguf_refusal`` accepts."""
    if cfg.qk_norm:
        return "qwen3"
    return "gpt2" if cfg.arch == "gpt2" else "gptneox"


def gguf_hparams(cfg: GPTConfig) -> dict[str, Any]:
    """The architecture's hyperparameters, as ``{key suffix: value}`` (keys are ``ARCH.suffix``;
    ints are written as uint32, floats as float32, bools as bool)."""
    h: dict[str, Any] = {"context_length": cfg.block_size, "embedding_length": cfg.d_model,
                         "feed_forward_length": cfg.ffn_size, "block_count": cfg.n_layer,
                         "attention.head_count": cfg.n_head}
    arch = gguf_arch(cfg)
    if arch == "qwen3":
        h |= {"attention.head_count_kv": cfg.n_head, "attention.layer_norm_rms_epsilon": cfg.norm_eps,
              "rope.freq_base": cfg.rotary_base, "rope.dimension_count": cfg.head_size,
              "attention.key_length": cfg.head_size, "attention.value_length": cfg.head_size}
    else:
        h["attention.layer_norm_epsilon"] = cfg.norm_eps
    if arch == "gptneox":
        h |= {"rope.dimension_count": cfg.rotary_dim, "rope.freq_base": cfg.rotary_base,
              "use_parallel_residual": cfg.parallel_residual}
    return h


def gguf_tensors(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> {GGUF tensor name: fp32 tensor}, shaped as torch holds them ((out, in)
    for matrices: GGUF lists dimensions innermost first, so llama.cpp reads them as {in, out})."""
    state = {k: v.detach().float() for k, v in state.items()}
    arch = gguf_arch(cfg)
    if arch == "qwen3":
        return _qwen3_tensors(cfg, state)
    out = {"token_embd.weight": state["wte.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = state["wpe.weight"]
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in (("ln1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
                             ("ln2", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
            weight = state[p + ours + ".weight"]
            out[b + theirs + ".weight"] = weight
            # llama.cpp's gpt2 / gptneox require every bias: a bias-free model has zeros there.
            out[b + theirs + ".bias"] = state.get(p + ours + ".bias", torch.zeros(weight.size(0)))
    out["output_norm.weight"] = state["ln_f.weight"]
    out["output_norm.bias"] = state.get("ln_f.bias", torch.zeros(cfg.d_model))
    if arch == "gptneox" or not cfg.tied:  # gptneox has no tied form; gpt2 reads token_embd when absent
        out["output.weight"] = state["lm_head.weight"] if not cfg.tied else state["wte.weight"]
    return out


def _centred(w: torch.Tensor) -> torch.Tensor:
    """Rows of a matrix that writes into the residual stream (out = C rows) minus their mean,
    so every written vector has zero mean over the C channels."""
    return w - w.mean(dim=0, keepdim=True)


def _qwen3_tensors(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layernorm = _norm_kind(cfg) == "layernorm"
    centre = _centred if layernorm else (lambda w: w)
    hs, width, ffn = cfg.head_size, cfg.attn_width, cfg.ffn_size
    wte = state["wte.weight"]  # (V, C)
    out = {"token_embd.weight": centre(wte.t()).t() if layernorm else wte}
    ones = torch.ones(hs)
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        qkv = state[p + "attn.qkv.weight"]  # rows (3, nh, hs)
        fc = state[p + "mlp.fc.weight"]  # rows (gate, value)
        out |= {
            b + "attn_norm.weight": state[p + "ln1.weight"],
            b + "attn_q.weight": qkv[:width], b + "attn_k.weight": qkv[width:2 * width],
            b + "attn_v.weight": qkv[2 * width:],
            b + "attn_q_norm.weight": state.get(p + "attn.q_gain", ones),
            b + "attn_k_norm.weight": state.get(p + "attn.k_gain", ones),
            b + "attn_output.weight": centre(state[p + "attn.proj.weight"]),
            b + "ffn_norm.weight": state[p + "ln2.weight"],
            b + "ffn_gate.weight": fc[:ffn], b + "ffn_up.weight": fc[ffn:],
            b + "ffn_down.weight": centre(state[p + "mlp.proj.weight"]),
        }
    out["output_norm.weight"] = state["ln_f.weight"]
    if layernorm or not cfg.tied:  # the head reads the uncentred embedding
        out["output.weight"] = state["wte.weight"] if cfg.tied else state["lm_head.weight"]
    return out
