"""Exact conversion between pilelm runs and Hugging Face ``transformers`` folders: the
``pilelm export`` and ``pilelm import`` stages.

The stages know no model family: a family's ``ModelSpec.hf_adapter`` names its adapter module
(``interop/gpt2_neox.py``: GPT-2 / GPT-NeoX; ``interop/bert.py``: BERT), whose ``ADAPTER``
maps configs and weights both ways (``interop/adapter.py``). Export writes ``config.json``,
``model.safetensors``, the tokenizer and, for causal LMs, ``generation_config.json``, so
``AutoModelFor...`` / ``AutoTokenizer.from_pretrained(folder)`` work offline. Import reads
such folders back, including ones made by transformers itself (safetensors or
``weights_only`` PyTorch files, sharded or not).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from pilelm.core.atomic import atomic_path, atomic_write_text
from pilelm.core.config import dump_yaml, to_dict
from pilelm.core.manifest import MANIFEST, Timer, clear_manifest, read_manifest, require_stage, write_manifest
from pilelm.interop.adapter import HFAdapter
from pilelm.models import build_model, families, get_spec, spec_for
from pilelm.models.dtypes import DTYPES
from pilelm.training.checkpoint import (
    checkpoint_dir,
    load_for_inference,
    mark_complete,
    resolve_checkpoint,
    save_model,
    stored_weight_formats,
)
from pilelm.training.resume import discard_run, require_separate_output

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Adapters


def adapter_for(family: str) -> HFAdapter:
    """The Hugging Face adapter of a model family (its spec names the module)."""
    return importlib.import_module(get_spec(family).hf_adapter).ADAPTER


def adapter_of(cfg: Any) -> HFAdapter:
    """The Hugging Face adapter of a model config."""
    return adapter_for(spec_for(cfg).family)


def config_from_hf(hf: dict[str, Any], weights: dict[str, torch.Tensor], source: str = "") -> Any:
    """Our model config of an HF config dict (``config.to_dict()``) and its weights."""
    kind = hf.get("model_type")
    known = []
    for family in families():
        adapter = adapter_for(family)
        if kind in adapter.model_types:
            return adapter.config_from_hf(hf, weights, source)
        known += adapter.model_types
    raise ValueError(f"{source}: model_type {kind!r} is not supported; pilelm imports {', '.join(known)}")


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
# Tokenizer files


def _load_export_tokenizer(tok_dir: Path) -> tuple[Any, int | None, int | None]:
    """The run's tokenizer and its (bos, eos) ids for the model config. Saved into the HF
    folder (tokenizer.json + the files AutoTokenizer reads, chat template included) with
    ``.save(folder)`` once the whole export is known to be possible."""
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    bos = tok.eod_id if tok.kind == "bpe" else tok.cls_id  # GPT-2/NeoX: bos = eos = <|endoftext|>
    return tok, bos, tok.eod_id


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
    """Run directory to export (pilelm train or pilelm import output), or a pilelm finetune output (exported as a *ForSequenceClassification / *ForTokenClassification model)."""
    format: Literal["hf", "sentence-transformers"] = "hf"
    """Output format: hf = a Hugging Face transformers folder; sentence-transformers = that folder
    plus pooling and normalisation modules, for an embedder (interop/embedder.py)."""
    output: str = ""
    """Output folder (-o)."""
    step: int | None = None
    """Checkpoint step to export; None = the latest."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the exported weights."""
    pooling: Literal["auto", "mean", "last", "cls"] = "auto"
    """sentence-transformers: how token states become one vector; auto = the pooling the run was trained with (finetune-contrastive), else mean (pilelm embed's default)."""

    def __post_init__(self) -> None:
        if self.format not in ("hf", "sentence-transformers"):
            raise ValueError(f"format must be hf or sentence-transformers, got {self.format!r}")


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


def _refuse_compressed_weights(run: str, step: int | None) -> None:
    """transformers' GPT-2 / GPT-NeoX / BERT configs hold float weights only."""
    _, ckpt = resolve_checkpoint(run, step)
    formats = stored_weight_formats(ckpt)
    if formats:
        source = [i["path"] for i in read_manifest(run).get("inputs", [])][:1]
        kinds = ", ".join(f"{k} {v.get('method', '')}".strip() for k, v in formats.items())
        raise ValueError(f"{run} holds {kinds} weights, which a transformers model folder cannot "
                         f"hold; export the run they were made from{f' ({source[0]})' if source else ''} "
                         "and quantize on the transformers side")


def run_export(cfg: ExportConfig) -> Path:
    if not cfg.run or not cfg.output:
        raise ValueError("export needs a run and an output: pilelm export RUN_DIR --format hf -o HF_DIR")
    if (Path(cfg.run) / MANIFEST).is_file() and read_manifest(cfg.run).get("stage") == "finetune":
        return export_finetuned(cfg)  # a task model: *ForSequenceClassification / *ForTokenClassification
    timer = Timer()
    out = Path(cfg.output)
    with timer("export"):
        model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step)
        _refuse_compressed_weights(cfg.run, cfg.step)
        # Everything that can refuse runs before anything is written.
        adapter, hf_state = export_state(model, model_cfg)
        dtype = DTYPES[cfg.dtype]
        hf_state = {k: v.detach().to(dtype).contiguous() for k, v in hf_state.items()}
        tok, bos, eos = _load_export_tokenizer(Path(tok_dir))
        hf_cfg = adapter.hf_config(model_cfg, bos, eos, cfg.dtype)
        if cfg.format == "sentence-transformers":
            from pilelm.interop import embedder

            pooling = embedder.run_pooling(cfg.run, cfg.pooling, spec_for(model_cfg).causal)
        clear_manifest(out)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(hf_state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out / "config.json", hf_cfg.to_json_string())
        if spec_for(model_cfg).causal:
            from transformers import GenerationConfig

            gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
            atomic_write_text(out / "generation_config.json", gen.to_json_string())
        extra: dict[str, Any] = {"architectures": hf_cfg.architectures}
        if cfg.format == "sentence-transformers":
            pad = tok.specials.get("pad", tok.specials.get("eod"))
            embedder.write_sentence_transformers_files(out, pooling, model_cfg.d_model, model_cfg.block_size, pad)
            extra["pooling"] = pooling
    n_params = sum(v.numel() for v in hf_state.values())
    write_manifest(out, "export", cfg, inputs=[cfg.run], counts={"parameters": n_params},
                   timings=timer.timings, extra=extra)
    log.info("exported %s (%s, %d parameters) to %s", cfg.run, hf_cfg.architectures[0], n_params, out)
    return out


def export_finetuned(cfg: ExportConfig) -> Path:
    """``pilelm export FT_DIR`` for a fine-tuned directory: its best checkpoint as a
    ``*For{Sequence,Token}Classification`` folder (``interop/heads.py``) with ``id2label``,
    ``label2id`` and ``pad_token_id`` set."""
    from pilelm.finetune.model import load_task_model
    from pilelm.interop.heads import task_model_to_hf

    ft_dir, out = Path(cfg.run), Path(cfg.output)
    require_stage(ft_dir, "finetune", what="fine-tuned model")
    if cfg.format != "hf":
        raise ValueError(f"{ft_dir} is a task model (classifier / tagger): export it with --format hf; "
                         "--format sentence-transformers is for embedders (a train or finetune-contrastive run)")
    timer = Timer()
    with timer("export"):
        model = load_task_model(ft_dir / "best")
        trunk_cfg = model.trunk.cfg
        adapter, lm_state = export_state(model.trunk, trunk_cfg)
        tok, bos, eos = _load_export_tokenizer(ft_dir / "tokenizer")
        hf_cfg = adapter.hf_config(trunk_cfg, bos, eos, cfg.dtype)
        architecture, state = task_model_to_hf(model, lm_state, hf_cfg.architectures[0])
        state = {k: v.to(DTYPES[cfg.dtype]).contiguous() for k, v in state.items()}
        clear_manifest(out)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        hf_cfg.architectures = [architecture]
        hf_cfg.id2label = model.head.id2label
        hf_cfg.label2id = {label: i for i, label in model.head.id2label.items()}
        hf_cfg.pad_token_id = model.head.pad_id
        if model.head.kind == "sequence":
            hf_cfg.problem_type = "single_label_classification"
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out / "config.json", hf_cfg.to_json_string())
    n_params = sum(v.numel() for v in state.values())
    write_manifest(out, "export", cfg, inputs=[ft_dir], counts={"parameters": n_params}, timings=timer.timings,
                   extra={"architectures": [architecture], "task": model.head.task})
    log.info("exported %s (%s, %d labels) to %s", ft_dir, architecture, len(model.head.labels), out)
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
        require_separate_output(source, out, "the model it imports")
        discard_run(out, "a new model is imported there")  # no older step may outrank step 0
        _import_tokenizer(Path(cfg.tokenizer) if cfg.tokenizer else source, out / "tokenizer")
        ckpt = checkpoint_dir(out, 0)
        save_model(ckpt, model, model_cfg)
        mark_complete(ckpt)
        # The model section of a `pilelm train` config (training/config.py: family + its section).
        spec = spec_for(model_cfg)
        atomic_write_text(out / "config.yaml", dump_yaml({"family": spec.family,
                                                          spec.config_section: to_dict(model_cfg)}))
    n_params = sum(p.numel() for p in model.parameters())
    write_manifest(out, "import", cfg, inputs=[source], counts={"parameters": n_params}, timings=timer.timings,
                   extra={"model_type": hf_dict.get("model_type")})
    log.info("imported %s (%s, %d parameters) into %s", source, hf_dict.get("model_type"), n_params, out)
    return out


def _normalised_hf_config(source: Path) -> dict[str, Any]:
    """config.json as transformers reads it (old key names such as rotary_pct mapped)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(source)).to_dict()


