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
    from pilelm.tokens.identity import require_same_tokenizer

    step_dir, run_dir = ckpt_io.resolve_init_checkpoint(Path(cfg.init_from))
    mcfg = config_from_spec(json.loads((step_dir / "model.json").read_text()))
    spec = spec_for(mcfg)
    mcfg = replace(mcfg, dropout=getattr(cfg, spec.config_section).dropout)
    if (run_dir / "tokenizer").is_dir():
        require_same_tokenizer(run_dir, tokenizer_dir, what="init_from")
    else:
        log.warning("init_from: %s has no tokenizer/ folder; cannot check it matches the data's", run_dir)
    return step_dir, replace(cfg, family=spec.family, **{spec.config_section: mcfg})
