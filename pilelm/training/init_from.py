"""``init_from``: the checkpoint a run starts from, and the model section it implies."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from pilelm.training import checkpoint as ckpt_io
from pilelm.training.config import TrainConfig

log = logging.getLogger(__name__)


def init_source(cfg: TrainConfig, tokenizer_dir: Path) -> tuple[Path, TrainConfig]:
    """``cfg.init_from`` -> (the checkpoint folder to start from, cfg with that model's section).

    Refuses a tokenizer other than the one the data was tokenized with: the ids would mean
    other tokens to the model.
    """
    from pilelm.models import config_from_spec, spec_for
    from pilelm.tokens.tokenizer import load_tokenizer

    step_dir, run_dir = ckpt_io.resolve_init_checkpoint(Path(cfg.init_from))
    mcfg = config_from_spec(json.loads((step_dir / "model.json").read_text()))
    spec = spec_for(mcfg)
    mcfg = replace(mcfg, dropout=getattr(cfg, spec.config_section).dropout)
    if (run_dir / "tokenizer").is_dir():
        theirs = load_tokenizer(run_dir / "tokenizer", fast=False).hf.get_vocab(with_added_tokens=True)
        ours = load_tokenizer(tokenizer_dir, fast=False).hf.get_vocab(with_added_tokens=True)
        if theirs != ours:
            raise ValueError(
                f"init_from: {run_dir / 'tokenizer'} is not the tokenizer the data was tokenized with "
                f"({tokenizer_dir}); tokenize with the model's own: pilelm tokenize DATA -o SHARDS "
                f"--tokenizer {run_dir / 'tokenizer'}")
    else:
        log.warning("init_from: %s has no tokenizer/ folder; cannot check it matches the data's", run_dir)
    return step_dir, replace(cfg, family=spec.family, **{spec.config_section: mcfg})
