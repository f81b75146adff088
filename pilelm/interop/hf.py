"""Exact conversion between pilelm runs and Hugging Face ``transformers`` folders.

Architectures (ours -> transformers class):

- GPT ``arch=gpt2`` -> ``GPT2LMHeadModel``. HF GPT-2 keeps OpenAI's ``Conv1D`` layers whose
  weight is (in, out), the transpose of ``nn.Linear``; its MLP uses ``gelu_new`` (the tanh
  approximation, = ``F.gelu(approximate="tanh")``).
- GPT ``arch=neox`` -> ``GPTNeoXForCausalLM``. HF's fused ``query_key_value`` output is laid
  out per head as (nh, 3, hs), ours as (3, nh, hs): the rows are permuted. ``rotary_pct`` ->
  ``partial_rotary_factor``, ``rotary_base`` -> ``rope_theta``.
- BERT -> ``BertForMaskedLM``, or ``BertForPreTraining`` with the NSP head (``AutoModelForMaskedLM``
  loads both). Our fused qkv is HF's query, key and value stacked.

A model without biases (``bias=False``) exports exactly with zero biases, since transformers'
GPT-2 always has them; import always builds ``bias=True``. Export writes ``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer, so
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` work offline. Import reads
such folders back, including ones made by transformers itself (Pythia, GPT-2 layouts: with
or without the ``transformer.`` prefix, with the old attention-mask buffers, safetensors or
``weights_only`` PyTorch files, sharded or not).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from pilelm.core.atomic import atomic_path, atomic_write_text
from pilelm.core.config import dump_yaml, to_dict
from pilelm.core.manifest import Timer, write_manifest
from pilelm.models import build_model
from pilelm.models.dtypes import DTYPES
from pilelm.models.gpt import GPTConfig
from pilelm.training.checkpoint import load_for_inference, mark_complete, save_model, step_dir_name

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Parameter name maps. Each entry: (our key, HF key, transform); transform "" copies, "T"
# transposes (Conv1D), "qkv" permutes NeoX's fused projection.


def _gpt2_map(cfg: GPTConfig) -> list[tuple[str, str, str]]:
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
    if not cfg.tied:
        m.append(("lm_head.weight", "lm_head.weight", ""))
    return m


def _neox_map(cfg: GPTConfig) -> list[tuple[str, str, str]]:
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
    if not cfg.tied:
        # The hub name; transformers 5 renames it to lm_head on load (conversion_mapping.py).
        m.append(("lm_head.weight", "embed_out.weight", ""))
    return m


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
    """Our GPT state dict -> the HF state dict of GPT2LMHeadModel / GPTNeoXForCausalLM."""
    out = {}
    for ours, theirs, how in _gpt2_map(cfg) if cfg.arch == "gpt2" else _neox_map(cfg):
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
    """The HF state dict of a GPT-2 / GPT-NeoX model -> our GPT state dict (strict)."""
    hf_state = _normalise_hf_keys(cfg.arch, hf_state)
    out, used = {}, set()
    for ours, theirs, how in _gpt2_map(cfg) if cfg.arch == "gpt2" else _neox_map(cfg):
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


# ---------------------------------------------------------------------------------------------
# Configs


def gpt_hf_config(cfg: GPTConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> Any:
    """The transformers config object of our GPT config."""
    import transformers

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
        hf.architectures = ["GPT2LMHeadModel"]
    else:
        hf = transformers.GPTNeoXConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            intermediate_size=cfg.ffn_size, hidden_act="gelu", max_position_embeddings=cfg.block_size,
            rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base,
            use_parallel_residual=cfg.parallel_residual, layer_norm_eps=cfg.norm_eps,
            hidden_dropout=cfg.dropout, attention_dropout=0.0, attention_bias=cfg.bias, **common,
        )
        hf.architectures = ["GPTNeoXForCausalLM"]
    hf.dtype = dtype
    return hf


def _ffn(width: int | None, d_model: int) -> int:
    """Our d_ff: 0 stands for the default 4 * d_model."""
    return 0 if not width or width == 4 * d_model else int(width)


def gpt_config_from_hf(hf: dict[str, Any], source: str = "") -> GPTConfig:
    """Our GPT config of a transformers config dict (``config.to_dict()``)."""
    kind = hf.get("model_type")
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
            n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=_ffn(hf.get("n_inner"), hf["n_embd"]),
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
            d_ff=_ffn(hf["intermediate_size"], hf["hidden_size"]), dropout=float(hf.get("hidden_dropout", 0.0)),
            bias=True,
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
            rotary_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
        )
    raise ValueError(f"{source}: model_type {kind!r} is not supported; pilelm imports gpt2, gpt_neox and bert")


# ---------------------------------------------------------------------------------------------
# Reading HF weight files


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of an HF folder: model.safetensors, sharded safetensors (with an index),
    or pytorch_model.bin (loaded with weights_only=True: never unpickles code)."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_torch_bin)):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(loader(folder / f))
            return state
    if (folder / "model.safetensors").is_file():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _load_torch_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# BERT (pilelm.models.bert) <-> BertForPreTraining / BertForMaskedLM


def _bert_map(cfg: Any) -> list[tuple[str, str, str]]:
    m = [
        ("wte.weight", "bert.embeddings.word_embeddings.weight", ""),
        ("wpe.weight", "bert.embeddings.position_embeddings.weight", ""),
        ("wtt.weight", "bert.embeddings.token_type_embeddings.weight", ""),
        ("ln_emb.weight", "bert.embeddings.LayerNorm.weight", ""),
        ("ln_emb.bias", "bert.embeddings.LayerNorm.bias", ""),
    ]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        # Our fused qkv rows are (3, nh, hs): query, key and value are its three row blocks.
        for j, name in enumerate(("query", "key", "value")):
            m += [(p + "qkv.weight", h + f"attention.self.{name}.weight", f"part{j}"),
                  (p + "qkv.bias", h + f"attention.self.{name}.bias", f"part{j}")]
        m += [
            (p + "proj.weight", h + "attention.output.dense.weight", ""),
            (p + "proj.bias", h + "attention.output.dense.bias", ""),
            (p + "ln1.weight", h + "attention.output.LayerNorm.weight", ""),
            (p + "ln1.bias", h + "attention.output.LayerNorm.bias", ""),
            (p + "fc.weight", h + "intermediate.dense.weight", ""),
            (p + "fc.bias", h + "intermediate.dense.bias", ""),
            (p + "fc_out.weight", h + "output.dense.weight", ""),
            (p + "fc_out.bias", h + "output.dense.bias", ""),
            (p + "ln2.weight", h + "output.LayerNorm.weight", ""),
            (p + "ln2.bias", h + "output.LayerNorm.bias", ""),
        ]
    m += [
        ("mlm_dense.weight", "cls.predictions.transform.dense.weight", ""),
        ("mlm_dense.bias", "cls.predictions.transform.dense.bias", ""),
        ("mlm_ln.weight", "cls.predictions.transform.LayerNorm.weight", ""),
        ("mlm_ln.bias", "cls.predictions.transform.LayerNorm.bias", ""),
        ("mlm_bias", "cls.predictions.bias", ""),
    ]
    if cfg.nsp:
        m += [
            ("pooler.weight", "bert.pooler.dense.weight", ""),
            ("pooler.bias", "bert.pooler.dense.bias", ""),
            ("nsp_head.weight", "cls.seq_relationship.weight", ""),
            ("nsp_head.bias", "cls.seq_relationship.bias", ""),
        ]
    return m


def bert_to_hf(cfg: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs, how in _bert_map(cfg):
        t = state[ours]
        if how.startswith("part"):
            t = t.chunk(3, dim=0)[int(how[4:])]
        out[theirs] = t.contiguous()
    return out


def bert_from_hf(cfg: Any, hf_state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("position_ids")}  # old buffer
    if "cls.predictions.bias" not in hf_state and "cls.predictions.decoder.bias" in hf_state:
        hf_state["cls.predictions.bias"] = hf_state["cls.predictions.decoder.bias"]
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    used = set()
    for ours, theirs, how in _bert_map(cfg):
        if theirs not in hf_state:
            raise ValueError(f"{source}: the checkpoint has no weight {theirs!r}")
        used.add(theirs)
        if how.startswith("part"):
            parts.setdefault(ours, [None, None, None])[int(how[4:])] = hf_state[theirs]
        else:
            out[ours] = hf_state[theirs].contiguous()
    for ours, (q, k, v) in parts.items():
        out[ours] = torch.cat([q, k, v], dim=0)
    # Tied or unused by a masked LM: the decoder copies of the embedding / bias, and a pooler
    # without an NSP head (BertForMaskedLM drops it).
    ignorable = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if not cfg.nsp:
        ignorable |= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    extra = sorted(set(hf_state) - used - ignorable)
    if extra:
        raise ValueError(f"{source}: weights with no place in a pilelm bert model: {extra[:8]}")
    return out


def bert_hf_config(cfg: Any, bos_id: int | None, eos_id: int | None, dtype: str) -> Any:
    import transformers

    hf = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.block_size, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
    )
    hf.architectures = ["BertForPreTraining" if cfg.nsp else "BertForMaskedLM"]
    hf.dtype = dtype
    return hf


def bert_config_from_hf(hf: dict[str, Any], source: str = "", has_nsp: bool = False) -> Any:
    from pilelm.models.bert import BertConfig

    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: BERT activation {hf.get('hidden_act')!r} is not supported (exact gelu only)")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise ValueError(f"{source}: only encoder BERT with absolute positions is supported")
    return BertConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=_ffn(hf["intermediate_size"], hf["hidden_size"]), dropout=float(hf.get("hidden_dropout_prob", 0.1)), type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), nsp=has_nsp, init_std=hf.get("initializer_range", 0.02),
    )


# ---------------------------------------------------------------------------------------------
# Family dispatch


@dataclass(frozen=True)
class HFAdapter:
    """How one pilelm model family maps to transformers."""

    to_hf: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    from_hf: Callable[[Any, dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    hf_config: Callable[[Any, int | None, int | None, str], Any]
    model_types: tuple[str, ...]


ADAPTERS: dict[str, HFAdapter] = {
    "gpt": HFAdapter(gpt_to_hf, gpt_from_hf, gpt_hf_config, ("gpt2", "gpt_neox")),
    "bert": HFAdapter(bert_to_hf, bert_from_hf, bert_hf_config, ("bert",)),
}


def config_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor], source: str = "") -> Any:
    """Our model config of an HF config dict (and, for BERT, whether the weights have NSP)."""
    if hf.get("model_type") == "bert":
        return bert_config_from_hf(hf, source, has_nsp="cls.seq_relationship.weight" in weights)
    return gpt_config_from_hf(hf, source)


def adapter_of(cfg: Any) -> HFAdapter:
    from pilelm.models import family_of

    family = family_of(cfg)
    if family not in ADAPTERS:
        raise ValueError(f"no Hugging Face mapping for model family {family!r}")
    return ADAPTERS[family]


# ---------------------------------------------------------------------------------------------
# Tokenizer files


def _export_tokenizer(tok_dir: Path, out_dir: Path) -> tuple[int | None, int | None]:
    """Write the run's tokenizer into the HF folder (tokenizer.json + the files AutoTokenizer
    reads); returns its (bos, eos) ids for the model config."""
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    tok.save(out_dir)
    bos = tok.eod_id if tok.kind == "bpe" else tok.cls_id  # GPT-2/NeoX: bos = eos = <|endoftext|>
    return bos, tok.eod_id


def _import_tokenizer(source: Path, out_dir: Path) -> None:
    """The HF folder's tokenizer (tokenizer.json, or a slow format transformers converts)
    saved as a pilelm tokenizer dir."""
    from pilelm.tokens.tokenizer import load_tokenizer

    load_tokenizer(source).save(out_dir)


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass
class ExportConfig:
    run: str = ""
    """Run directory to export (pilelm train or pilelm import output)."""
    format: Literal["hf"] = "hf"
    """Output format: hf = a Hugging Face transformers folder."""
    output: str = ""
    """Output folder (-o)."""
    step: int | None = None
    """Checkpoint step to export; None = the latest."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the exported weights."""

    def __post_init__(self) -> None:
        if self.format != "hf":
            raise ValueError(f"format must be hf, got {self.format!r}")


@dataclass
class ImportConfig:
    source: str = ""
    """A Hugging Face model folder (config.json + weights + tokenizer), e.g. a local Pythia or GPT-2."""
    output: str = ""
    """Run directory to create (-o); pilelm eval / generate / serve / train read it."""
    tokenizer: str = ""
    """Folder of the tokenizer if not the source folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the imported weights (float32 to continue training)."""


def export_state(model: torch.nn.Module, cfg: Any) -> tuple[HFAdapter, dict[str, torch.Tensor]]:
    """(HF adapter, HF state dict) of a pilelm model."""
    adapter = adapter_of(cfg)
    return adapter, adapter.to_hf(cfg, dict(model.state_dict()))


def run_export(cfg: ExportConfig) -> Path:
    if not cfg.run or not cfg.output:
        raise ValueError("export needs a run and an output: pilelm export RUN_DIR --format hf -o HF_DIR")
    timer = Timer()
    out = Path(cfg.output)
    with timer("export"):
        model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step)
        adapter, hf_state = export_state(model, model_cfg)
        dtype = DTYPES[cfg.dtype]
        hf_state = {k: v.detach().to(dtype).contiguous() for k, v in hf_state.items()}
        out.mkdir(parents=True, exist_ok=True)
        bos, eos = _export_tokenizer(Path(tok_dir), out)
        hf_cfg = adapter.hf_config(model_cfg, bos, eos, cfg.dtype)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(hf_state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out / "config.json", hf_cfg.to_json_string())
        if isinstance(model_cfg, GPTConfig):
            from transformers import GenerationConfig

            gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
            atomic_write_text(out / "generation_config.json", gen.to_json_string())
    n_params = sum(v.numel() for v in hf_state.values())
    write_manifest(out, "export", cfg, inputs=[cfg.run], counts={"parameters": n_params},
                   timings=timer.timings, extra={"architectures": hf_cfg.architectures})
    log.info("exported %s (%s, %d parameters) to %s", cfg.run, hf_cfg.architectures[0], n_params, out)
    return out


def run_import(cfg: ImportConfig) -> Path:
    if not cfg.source or not cfg.output:
        raise ValueError("import needs a source folder and an output: pilelm import HF_DIR -o RUN_DIR")
    source, out = Path(cfg.source), Path(cfg.output)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a Hugging Face model folder")
    timer = Timer()
    with timer("import"):
        hf_dict = _normalised_hf_config(source)
        weights = read_hf_weights(source)
        model_cfg = config_from_hf(hf_dict, weights, str(source))
        state = adapter_of(model_cfg).from_hf(model_cfg, weights, str(source))
        model = build_model(model_cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and getattr(model_cfg, "tied", False))]
        if missing or unexpected:
            raise ValueError(f"{source}: converted weights do not fit: missing {missing}, unexpected {unexpected}")
        model.to(DTYPES[cfg.dtype])
        _import_tokenizer(Path(cfg.tokenizer) if cfg.tokenizer else source, out / "tokenizer")
        ckpt = out / "checkpoints" / step_dir_name(0)
        save_model(ckpt, model, model_cfg)
        mark_complete(ckpt)
        # The model section of a `pilelm train` config (train.py: family + model or bert).
        family = "gpt" if isinstance(model_cfg, GPTConfig) else "bert"
        section = "model" if family == "gpt" else "bert"
        atomic_write_text(out / "config.yaml", dump_yaml({"family": family, section: to_dict(model_cfg)}))
    n_params = sum(p.numel() for p in model.parameters())
    write_manifest(out, "import", cfg, inputs=[source], counts={"parameters": n_params}, timings=timer.timings,
                   extra={"model_type": hf_dict.get("model_type")})
    log.info("imported %s (%s, %d parameters) into %s", source, hf_dict.get("model_type"), n_params, out)
    return out


def _normalised_hf_config(source: Path) -> dict[str, Any]:
    """config.json as transformers reads it (old key names such as rotary_pct mapped)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(source)).to_dict()


