"""The GPT family's RMSNorm + SwiGLU form (``pilelm.models.gpt``) <-> ``LlamaForCausalLM`` /
``Qwen3ForCausalLM``.

A GPT with ``arch=neox``, ``norm=rmsnorm``, ``mlp=swiglu``, rotary on every head dimension,
sequential residual, no biases and no logit soft-cap is Llama's block (Touvron et al. 2023);
with ``qk_norm`` + ``qk_norm_gain`` (RMS over each head's queries and keys with one learnable
gain per head dimension, epsilon ``norm_eps``, before rotary) it is Qwen3's (Qwen3 technical
report 2025, sec. 2). Both are native transformers classes (no ``trust_remote_code``), and
llama.cpp / vLLM run them.

Layouts: our fused ``attn.qkv`` rows are (3, nh, hs): its three row blocks are ``q_proj``,
``k_proj``, ``v_proj``. Our SwiGLU ``mlp.fc`` rows are (gate, value): ``gate_proj``,
``up_proj``. ``head_dim`` is explicit in both configs, so heads pruned to another width export
too. Grouped-query attention (fewer key/value heads) has no pilelm form and is refused on import.
"""

from __future__ import annotations

from typing import Any

import torch

from pilelm.interop.adapter import WeightMap
from pilelm.models.gpt import GPTConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""The transformers class of each target with the causal-LM head."""


def target(cfg: GPTConfig) -> str:
    """``qwen3`` or ``llama`` for a config of this form; raises (naming the fix) for one that
    neither class computes exactly."""
    wrong = {k: v for k, v in (("arch", cfg.arch if cfg.arch != "neox" else None),
                               ("mlp", cfg.mlp if cfg.mlp != "swiglu" else None),
                               ("rotary_pct", cfg.rotary_pct if cfg.rotary_pct != 1.0 else None),
                               ("parallel_residual", cfg.parallel_residual or None),
                               ("bias", cfg.bias or None),
                               ("logit_softcap", cfg.logit_softcap or None)) if v is not None}
    if cfg.qk_norm and not cfg.qk_norm_gain:
        wrong["qk_norm_gain"] = False
    if wrong:
        raise ValueError(f"this RMSNorm model uses {wrong}, which transformers' Llama / Qwen3 cannot express "
                         "exactly; export needs model.arch=neox, model.mlp=swiglu, model.rotary_pct=1.0, "
                         "model.parallel_residual=false, model.bias=false, model.logit_softcap=0 and, with "
                         "model.qk_norm, model.qk_norm_gain=true (the cpu-10min recipe's form)")
    return "qwen3" if cfg.qk_norm else "llama"


def _weight_map(cfg: GPTConfig) -> WeightMap:
    """Rows (our key, HF key, transform); "i/n" takes the i-th of n equal row blocks."""
    m = [("wte.weight", "model.embed_tokens.weight", "")]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        m += [
            (p + "ln1.weight", h + "input_layernorm.weight", ""),
            (p + "attn.qkv.weight", h + "self_attn.q_proj.weight", "0/3"),
            (p + "attn.qkv.weight", h + "self_attn.k_proj.weight", "1/3"),
            (p + "attn.qkv.weight", h + "self_attn.v_proj.weight", "2/3"),
            (p + "attn.proj.weight", h + "self_attn.o_proj.weight", ""),
            (p + "ln2.weight", h + "post_attention_layernorm.weight", ""),
            (p + "mlp.fc.weight", h + "mlp.gate_proj.weight", "0/2"),
            (p + "mlp.fc.weight", h + "mlp.up_proj.weight", "1/2"),
            (p + "mlp.proj.weight", h + "mlp.down_proj.weight", ""),
        ]
        if cfg.qk_norm:
            m += [(p + "attn.q_gain", h + "self_attn.q_norm.weight", ""),
                  (p + "attn.k_gain", h + "self_attn.k_norm.weight", "")]
    m.append(("ln_f.weight", "model.norm.weight", ""))
    if not cfg.tied:
        m.append(("lm_head.weight", "lm_head.weight", ""))
    return m


def to_hf(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> the HF state dict of LlamaForCausalLM / Qwen3ForCausalLM."""
    target(cfg)
    out = {}
    for ours, theirs, how in _weight_map(cfg):
        if ours not in state:
            raise KeyError(f"model state has no {ours!r}")
        t = state[ours]
        if how:
            i, n = map(int, how.split("/"))
            t = t.chunk(n, dim=0)[i]
        out[theirs] = t.contiguous()
    return out


def from_hf(cfg: GPTConfig, hf_state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """The HF state dict of a Llama / Qwen3 model -> our GPT state dict (strict)."""
    parts: dict[str, list[torch.Tensor | None]] = {}
    used = set()
    for ours, theirs, how in _weight_map(cfg):
        if theirs not in hf_state:
            raise ValueError(f"{source}: the checkpoint has no weight {theirs!r}")
        used.add(theirs)
        i, n = map(int, how.split("/")) if how else (0, 1)
        parts.setdefault(ours, [None] * n)[i] = hf_state[theirs]
    if cfg.tied:  # a tied output layer may be saved as its own (equal) tensor
        used.add("lm_head.weight")
    extra = sorted(k for k in set(hf_state) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"{source}: weights with no place in a pilelm model: {extra[:8]}")
    return {k: torch.cat(v, dim=0).contiguous() for k, v in parts.items()}


def hf_config(cfg: GPTConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> Any:
    """The transformers config object (LlamaConfig / Qwen3Config) of our GPT config."""
    import transformers

    kind = target(cfg)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=cfg.tied,
        initializer_range=cfg.init_std, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    if kind == "qwen3":
        hf = transformers.Qwen3Config(use_sliding_window=False, **common)
    else:
        hf = transformers.LlamaConfig(mlp_bias=False, **common)
    hf.architectures = [ARCHITECTURES[kind]]
    hf.dtype = dtype
    return hf


def _swiglu_d_ff(intermediate: int, d_model: int) -> int:
    """Our d_ff of an HF intermediate size: 0 stands for the SwiGLU default (8/3 d, to 64)."""
    return 0 if intermediate == GPTConfig(d_model=d_model, n_head=1, mlp="swiglu").ffn_size else int(intermediate)


def config_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
                   source: str = "") -> GPTConfig:
    """Our GPT config of a Llama / Qwen3 transformers config dict (``config.to_dict()``)."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type {kind!r} is not a Llama or Qwen3 config")
    heads = hf["num_attention_heads"]
    why = []
    if hf.get("hidden_act", "silu") != "silu":
        why.append(f"activation {hf.get('hidden_act')!r} (silu only)")
    if (hf.get("num_key_value_heads") or heads) != heads:
        why.append(f"grouped-query attention ({hf['num_key_value_heads']} key/value heads for {heads})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        why.append("biases (attention_bias / mlp_bias)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        why.append(f"rope {rope} (default, full rotary only)")
    if hf.get("use_sliding_window"):
        why.append("sliding-window attention")
    if why:
        raise ValueError(f"{source}: this {kind} model uses {'; '.join(why)}, which pilelm's GPT cannot express")
    d_model = hf["hidden_size"]
    head_dim = hf.get("head_dim") or d_model // heads
    return GPTConfig(
        arch="neox", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=heads, d_model=d_model,
        d_ff=_swiglu_d_ff(hf["intermediate_size"], d_model),
        head_dim=0 if head_dim * heads == d_model else head_dim, dropout=0.0, bias=False,
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm="rmsnorm", rotary_pct=1.0,
        rotary_base=rope.get("rope_theta", 10000.0), parallel_residual=False,
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
        qk_norm=kind == "qwen3", qk_norm_gain=kind == "qwen3", mlp="swiglu",
    )
