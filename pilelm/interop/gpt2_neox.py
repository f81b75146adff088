"""The GPT family (``pilelm.models.gpt``) <-> ``GPT2LMHeadModel`` / ``GPTNeoXForCausalLM``
(LayerNorm models), ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` (RMSNorm models:
``interop/llama_qwen3.py``). Each function below hands an RMSNorm config to that module.

- ``arch=gpt2`` -> ``GPT2LMHeadModel``. HF GPT-2 keeps OpenAI's ``Conv1D`` layers whose
  weight is (in, out), the transpose of ``nn.Linear``; its MLP uses ``gelu_new`` (the tanh
  approximation, = ``F.gelu(approximate="tanh")``).
- ``arch=neox`` -> ``GPTNeoXForCausalLM``. HF's fused ``query_key_value`` output is laid
  out per head as (nh, 3, hs), ours as (3, nh, hs): the rows are permuted. ``rotary_pct`` ->
  ``partial_rotary_factor``, ``rotary_base`` -> ``rope_theta``.

A model without biases (``bias=False``) exports exactly with zero biases, since transformers'
GPT-2 always has them; import always builds ``bias=True``. Import reads folders made by
transformers itself too (Pythia, GPT-2 layouts: with or without the ``transformer.`` prefix,
with the old attention-mask buffers).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pilelm.interop import llama_qwen3
from pilelm.interop.adapter import HFAdapter, WeightMap, ffn_width
from pilelm.models.gpt import GPTConfig

# Parameter name maps. Each row: (our key, HF key, transform); transform "" copies, "T"
# transposes (Conv1D), "qkv" permutes NeoX's fused projection. A map is the trunk's rows
# plus the head's; the head decides the transformers class (``ARCHITECTURES``).

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM"}
"""The transformers class of each arch with the causal-LM head."""


def _gpt2_trunk(cfg: GPTConfig) -> WeightMap:
    m = [("wte.weight", "transformer.wte.weight", ""), ("wpe.weight", "transformer.wpe.weight", "")]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        m += [
            (p + "ln1.weight", h + "ln_1.weight", ""),
            (p + "ln1.bias", h + "ln_1.bias", ""),
            (p + "attn.qkv.weight", h + "attn.c_attn.weight", "T"),
            (p + "attn.qkv.bias", h + "attn.c_attn.bias", ""),
            (p + "attn.proj.weight", h + "attn.c_proj.weight", "T"),
            (p + "attn.proj.bias", h + "attn.c_proj.bias", ""),
            (p + "ln2.weight", h + "ln_2.weight", ""),
            (p + "ln2.bias", h + "ln_2.bias", ""),
            (p + "mlp.fc.weight", h + "mlp.c_fc.weight", "T"),
            (p + "mlp.fc.bias", h + "mlp.c_fc.bias", ""),
            (p + "mlp.proj.weight", h + "mlp.c_proj.weight", "T"),
            (p + "mlp.proj.bias", h + "mlp.c_proj.bias", ""),
        ]
    m += [("ln_f.weight", "transformer.ln_f.weight", ""), ("ln_f.bias", "transformer.ln_f.bias", "")]
    return m


def _neox_trunk(cfg: GPTConfig) -> WeightMap:
    m = [("wte.weight", "gpt_neox.embed_in.weight", "")]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        m += [
            (p + "ln1.weight", h + "input_layernorm.weight", ""),
            (p + "ln1.bias", h + "input_layernorm.bias", ""),
            (p + "attn.qkv.weight", h + "attention.query_key_value.weight", "qkv"),
            (p + "attn.qkv.bias", h + "attention.query_key_value.bias", "qkv"),
            (p + "attn.proj.weight", h + "attention.dense.weight", ""),
            (p + "attn.proj.bias", h + "attention.dense.bias", ""),
            (p + "ln2.weight", h + "post_attention_layernorm.weight", ""),
            (p + "ln2.bias", h + "post_attention_layernorm.bias", ""),
            (p + "mlp.fc.weight", h + "mlp.dense_h_to_4h.weight", ""),
            (p + "mlp.fc.bias", h + "mlp.dense_h_to_4h.bias", ""),
            (p + "mlp.proj.weight", h + "mlp.dense_4h_to_h.weight", ""),
            (p + "mlp.proj.bias", h + "mlp.dense_4h_to_h.bias", ""),
        ]
    m += [("ln_f.weight", "gpt_neox.final_layer_norm.weight", ""), ("ln_f.bias", "gpt_neox.final_layer_norm.bias", "")]
    return m


def _lm_head(cfg: GPTConfig) -> WeightMap:
    if cfg.tied:  # the output projection is the token embedding
        return []
    # NeoX: the hub name; transformers 5 renames it to lm_head on load (conversion_mapping.py).
    return [("lm_head.weight", "lm_head.weight" if cfg.arch == "gpt2" else "embed_out.weight", "")]


def _weight_map(cfg: GPTConfig) -> WeightMap:
    return (_gpt2_trunk(cfg) if cfg.arch == "gpt2" else _neox_trunk(cfg)) + _lm_head(cfg)


_NEOX_ATTN_BIAS = re.compile(r"attention\.(query_key_value|dense)\.bias$")


def _qkv_to_hf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows (3, nh, hs) -> (nh, 3, hs)
    return t.reshape(3, n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_from_hf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows (nh, 3, hs) -> (3, nh, hs)
    return t.reshape(n_head, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _bias_shape(key: str, cfg: GPTConfig) -> tuple[int, ...]:
    C = cfg.d_model
    if ".qkv." in key:
        return (3 * C,)
    if ".fc." in key:
        return (cfg.ffn_size,)
    return (C,)


def gpt_to_hf(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> the HF state dict of its transformers class (raises, naming the
    fix, for a model no class computes exactly)."""
    if cfg.norm == "rmsnorm":
        return llama_qwen3.to_hf(cfg, state)
    _refuse_inexact(cfg)
    out = {}
    for ours, theirs, how in _weight_map(cfg):
        if ours not in state:
            if ours.endswith(".bias") and not cfg.bias:
                if not _NEOX_ATTN_BIAS.search(theirs):  # those are absent with attention_bias=False
                    out[theirs] = torch.zeros(_bias_shape(ours, cfg))
                continue
            raise KeyError(f"model state has no {ours!r}")
        t = state[ours]
        if how == "T":
            t = t.t()
        elif how == "qkv":
            t = _qkv_to_hf(t, cfg.n_head)
        out[theirs] = t.contiguous()
    return out


def gpt_from_hf(cfg: GPTConfig, hf_state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """The HF state dict of a GPT-2 / GPT-NeoX / Llama / Qwen3 model -> our GPT state dict (strict)."""
    if cfg.norm == "rmsnorm":
        return llama_qwen3.from_hf(cfg, hf_state, source)
    hf_state = _normalise_hf_keys(cfg.arch, hf_state)
    out, used = {}, set()
    for ours, theirs, how in _weight_map(cfg):
        if theirs not in hf_state:
            if _NEOX_ATTN_BIAS.search(theirs):
                out[ours] = torch.zeros(_bias_shape(ours, cfg))  # attention_bias=False
                continue
            raise ValueError(f"{source}: the checkpoint has no weight {theirs!r}")
        used.add(theirs)
        t = hf_state[theirs]
        if how == "T":
            t = t.t()
        elif how == "qkv":
            t = _qkv_from_hf(t, cfg.n_head)
        out[ours] = t.contiguous()
    if cfg.tied:  # a tied output layer may be saved as its own (equal) tensor
        used |= {"lm_head.weight", "embed_out.weight"}
    extra = sorted(set(hf_state) - used)
    if extra:
        raise ValueError(f"{source}: weights with no place in a pilelm {cfg.arch} model: {extra[:8]}")
    return out


# Non-persistent buffers that older transformers versions saved with the weights.
_BUFFERS = re.compile(r"(\.attn\.(bias|masked_bias)|\.attention\.(bias|masked_bias|rotary_emb\.inv_freq))$")


def _normalise_hf_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if _BUFFERS.search(k):
            continue
        if arch == "gpt2" and not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k  # OpenAI's original GPT-2 checkpoints lack the prefix
        if arch == "neox" and k == "lm_head.weight":
            k = "embed_out.weight"  # transformers 5 name
        out[k] = v
    return out


def gpt_hf_config(cfg: GPTConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> Any:
    """The transformers config object of our GPT config."""
    import transformers

    if cfg.norm == "rmsnorm":
        return llama_qwen3.hf_config(cfg, bos_id, eos_id, dtype)
    _refuse_inexact(cfg)

    common = dict(
        vocab_size=cfg.vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=cfg.tied,
        initializer_range=cfg.init_std,
    )
    if cfg.arch == "gpt2":
        hf = transformers.GPT2Config(
            n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=cfg.ffn_size, activation_function="gelu_new", resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, **common,
        )
    else:
        hf = transformers.GPTNeoXConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            intermediate_size=cfg.ffn_size, hidden_act="gelu", max_position_embeddings=cfg.block_size,
            rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base,
            use_parallel_residual=cfg.parallel_residual, layer_norm_eps=cfg.norm_eps,
            hidden_dropout=cfg.dropout, attention_dropout=0.0, attention_bias=cfg.bias, **common,
        )
    hf.architectures = [ARCHITECTURES[cfg.arch]]
    hf.dtype = dtype
    return hf


def _refuse_inexact(cfg: GPTConfig) -> None:
    """Raise (naming the fix) for a LayerNorm model that GPT-2 / GPT-NeoX cannot compute exactly."""
    if cfg.attn_width != cfg.d_model:
        raise ValueError(f"this model has {cfg.n_head} heads of width {cfg.head_size} (heads were pruned), which "
                         f"transformers' GPT-2 and GPT-NeoX cannot express (they need n_head * head size == "
                         f"d_model = {cfg.d_model}); prune MLP channels only (heads=0) to keep it exportable, "
                         "or train with the RMSNorm form (it exports as Llama / Qwen3, whose head_dim is free)")
    if not cfg.standard:
        on = {k: v for k, v in (("qk_norm", cfg.qk_norm), ("mlp", cfg.mlp if cfg.mlp != "gelu" else None),
                                ("logit_softcap", cfg.logit_softcap)) if v}
        raise ValueError(f"this LayerNorm model uses {on}, which transformers' GPT-2 / GPT-NeoX cannot express "
                         "(and no other transformers class computes exactly); export needs model.qk_norm=false, "
                         "model.mlp=gelu and model.logit_softcap=0, or the cpu-10min recipe's current form "
                         "(model.norm=rmsnorm, model.mlp=swiglu, model.qk_norm_gain=true: Qwen3). Retrain with "
                         "one of those, or use this run with pilelm eval/generate/serve")


def gpt_config_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
                       source: str = "") -> GPTConfig:
    """Our GPT config of a transformers config dict (``config.to_dict()``)."""
    kind = hf.get("model_type")
    if kind in llama_qwen3.ARCHITECTURES:
        return llama_qwen3.config_from_hf(hf, weights, source)
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: GPT-2 activation {act!r} is not supported (pilelm gpt2 uses gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError(f"{source}: GPT-2 attention scaling other than 1/sqrt(head size) is not supported")
        if hf.get("add_cross_attention"):
            raise ValueError(f"{source}: GPT-2 with cross-attention is not supported")
        return GPTConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=ffn_width(hf.get("n_inner"), hf["n_embd"]),
            dropout=float(hf.get("resid_pdrop", 0.0)), bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
        )
    if kind == "gpt_neox":
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: GPT-NeoX activation {hf.get('hidden_act')!r} is not supported (exact gelu only)")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope type {rope.get('rope_type')!r} is not supported (default only)")
        return GPTConfig(
            arch="neox", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
            d_ff=ffn_width(hf["intermediate_size"], hf["hidden_size"]), dropout=float(hf.get("hidden_dropout", 0.0)),
            bias=True,
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
            rotary_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
        )
    raise ValueError(f"{source}: model_type {kind!r} is not a GPT-2 or GPT-NeoX config")


ADAPTER = HFAdapter(
    model_types=("gpt2", "gpt_neox", *llama_qwen3.ARCHITECTURES),
    config_from_hf=gpt_config_from_hf,
    hf_config=gpt_hf_config,
    to_hf=gpt_to_hf,
    from_hf=gpt_from_hf,
)
