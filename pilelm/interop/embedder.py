"""An embedder (a run ``pilelm embed`` / ``finetune-contrastive`` reads) as a
sentence-transformers folder: ``pilelm export RUN --format sentence-transformers -o DIR``.

The folder is the exact transformers export (``interop/hf.py``) plus the module files
sentence-transformers 6 reads, so ``SentenceTransformer(DIR).encode(texts)`` gives the vectors
of ``pilelm.inference.text_encoder.TextEncoder``: the base model's last hidden states (after the final
norm), pooled as the run was trained (``mean`` over real tokens, ``last`` real token, ``cls``
for BERT) and L2-normalised. Written by hand (no sentence-transformers import at export time);
the layout is what ``SentenceTransformer.save`` 6.2 writes, and tests/interop load it back.

The tokenizer gets a padding token (sentence-transformers pads batches; a GPT tokenizer has
none): its pad token, else its end-of-text token. Right padding with an attention mask leaves a
causal model's real tokens as they are, so the choice does not change a vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_json

_ST_POOLING = {"mean": "mean", "last": "lasttoken", "cls": "cls"}

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling",
     "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"},
]


def run_pooling(run: str | Path, requested: str, causal: bool) -> str:
    """The pooling to export: ``requested``, or with ``auto`` the one the run was trained with
    (``finetune-contrastive``'s ``pooling``), else ``pilelm embed``'s default, mean."""
    from pilelm.core.manifest import MANIFEST, read_manifest

    pooling = requested
    if requested == "auto":
        config = read_manifest(run).get("config", {}) if (Path(run) / MANIFEST).is_file() else {}
        pooling = (config.get("contrastive") or {}).get("pooling") or "mean"  # retrieval/contrastive.py
    if pooling not in _ST_POOLING:
        raise ValueError(f"pooling must be auto, mean, last or cls, got {pooling!r}")
    if pooling == "cls" and causal:
        raise ValueError("pooling=cls needs a BERT model (a causal model's first token sees only itself); "
                         "export with --pooling mean or --pooling last")
    return pooling


def write_sentence_transformers_files(out: Path, pooling: str, dim: int, max_seq_length: int,
                                      pad_token: str | None) -> None:
    """Add the sentence-transformers module files to an exported transformers folder."""
    atomic_write_json(out / "modules.json", MODULES)
    atomic_write_json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "max_seq_length": max_seq_length,
    })
    atomic_write_json(out / "1_Pooling" / "config.json",
                      {"embedding_dimension": dim, "pooling_mode": _ST_POOLING[pooling], "include_prompt": True})
    atomic_write_json(out / "2_Normalize" / "config.json",
                      {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    atomic_write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    if pad_token is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = out / name
            config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
            config.setdefault("pad_token", pad_token)
            atomic_write_json(path, config)
