"""The BERT family (``pilelm.models.bert``) <-> ``BertForMaskedLM`` / ``BertForPreTraining``.

``BertForPreTraining`` with the NSP head (``AutoModelForMaskedLM`` loads both). Our fused qkv
is HF's query, key and value stacked. A map is the encoder's rows plus the heads'.
"""

from __future__ import annotations

from typing import Any

import torch

from pilelm.interop.adapter import HFAdapter, WeightMap, ffn_width
from pilelm.models.bert import BertConfig

ARCHITECTURES = {"mlm": "BertForMaskedLM", "mlm+nsp": "BertForPreTraining"}
"""The transformers class of each set of heads."""


def _encoder(cfg: BertConfig) -> WeightMap:
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
    return m


def _mlm_head(cfg: BertConfig) -> WeightMap:
    # The decoder weight is the word embedding (tied); its bias is ours.
    return [
        ("mlm_dense.weight", "cls.predictions.transform.dense.weight", ""),
        ("mlm_dense.bias", "cls.predictions.transform.dense.bias", ""),
        ("mlm_ln.weight", "cls.predictions.transform.LayerNorm.weight", ""),
        ("mlm_ln.bias", "cls.predictions.transform.LayerNorm.bias", ""),
        ("mlm_bias", "cls.predictions.bias", ""),
    ]


def _nsp_head(cfg: BertConfig) -> WeightMap:
    return [
        ("pooler.weight", "bert.pooler.dense.weight", ""),
        ("pooler.bias", "bert.pooler.dense.bias", ""),
        ("nsp_head.weight", "cls.seq_relationship.weight", ""),
        ("nsp_head.bias", "cls.seq_relationship.bias", ""),
    ]


def _weight_map(cfg: BertConfig) -> WeightMap:
    return _encoder(cfg) + _mlm_head(cfg) + (_nsp_head(cfg) if cfg.nsp else [])


def bert_to_hf(cfg: BertConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs, how in _weight_map(cfg):
        t = state[ours]
        if how.startswith("part"):
            t = t.chunk(3, dim=0)[int(how[4:])]
        out[theirs] = t.contiguous()
    return out


def bert_from_hf(cfg: BertConfig, hf_state: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("position_ids")}  # old buffer
    if "cls.predictions.bias" not in hf_state and "cls.predictions.decoder.bias" in hf_state:
        hf_state["cls.predictions.bias"] = hf_state["cls.predictions.decoder.bias"]
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    used = set()
    for ours, theirs, how in _weight_map(cfg):
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


def bert_hf_config(cfg: BertConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> Any:
    import transformers

    hf = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.block_size, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
    )
    hf.architectures = [ARCHITECTURES["mlm+nsp" if cfg.nsp else "mlm"]]
    hf.dtype = dtype
    return hf


def bert_config_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
                        source: str = "") -> BertConfig:
    """Our BERT config of a transformers config dict; the NSP head is there if its weights are."""
    has_nsp = "cls.seq_relationship.weight" in (weights or {})
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: BERT activation {hf.get('hidden_act')!r} is not supported (exact gelu only)")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise ValueError(f"{source}: only encoder BERT with absolute positions is supported")
    return BertConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=ffn_width(hf["intermediate_size"], hf["hidden_size"]), dropout=float(hf.get("hidden_dropout_prob", 0.1)), type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), nsp=has_nsp, init_std=hf.get("initializer_range", 0.02),
    )


ADAPTER = HFAdapter(
    model_types=("bert",),
    config_from_hf=bert_config_from_hf,
    hf_config=bert_hf_config,
    to_hf=bert_to_hf,
    from_hf=bert_from_hf,
)
