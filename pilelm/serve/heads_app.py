"""``pilelm serve`` for models that do not generate: a fine-tuned classifier, tagger or
punctuation model (``/predict``), or an encoder run such as a BERT (``/embed``, ``/rerank``).

``serves_heads(path)`` says whether a directory is one of those (a ``finetune`` manifest, or a
run whose model is not causal); ``load_heads`` loads it; ``create_heads_app`` builds the app
(TEI's routes, ``heads.py``, behind the same browser guard as the LM app).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import FastAPI

from pilelm.serve.browser_guard import BrowserGuard, BrowserGuardMiddleware
from pilelm.serve.config import ServeConfig
from pilelm.serve.heads import (
    HeadsContext,
    add_embed_routes,
    add_error_handler,
    add_info_routes,
    add_predict_routes,
)

log = logging.getLogger(__name__)


def serves_heads(path: str | Path) -> bool:
    """True for a fine-tuned head directory or a run whose latest model is not a causal LM."""
    from pilelm.core.manifest import read_manifest
    from pilelm.models import config_from_spec, spec_for
    from pilelm.training.checkpoint import resolve_checkpoint

    path = Path(path)
    if not (path / "manifest.json").is_file():
        return False
    if read_manifest(path).get("stage") == "finetune":
        return True
    try:
        _, ckpt = resolve_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return False
    spec = json.loads((ckpt / "model.json").read_text())
    return not spec_for(config_from_spec(spec)).causal


def load_heads(cfg: ServeConfig) -> HeadsContext:
    """The model of ``cfg.run`` in a ``HeadsContext``: a ``Predictor`` for a fine-tune, a
    ``TextEncoder`` (mean pooling) for an encoder run."""
    from pilelm.core.manifest import read_manifest

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    name = cfg.model_name or Path(cfg.run).name or "pilelm"
    ctx = HeadsContext(name, api_key=cfg.resolved_api_key(), max_batch=cfg.max_batch,
                       max_request_bytes=cfg.max_request_bytes)
    if read_manifest(cfg.run).get("stage") == "finetune":
        from pilelm.finetune.predict import Predictor

        ctx.predictor = Predictor(cfg.run, cfg.device, batch_size=cfg.max_batch)
    else:
        from pilelm.inference.text_encoder import TextEncoder

        ctx.encoder = TextEncoder.from_run(cfg.run, cfg.step, device=cfg.device)
    return ctx


def create_heads_app(ctx: HeadsContext, cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="pilelm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BrowserGuardMiddleware, guard=BrowserGuard(cfg.host, cfg.allow_origin))
    if cfg.allow_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allow_origin), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    add_error_handler(app)
    add_info_routes(app, ctx)
    if ctx.predictor is not None:
        add_predict_routes(app, ctx)
    if ctx.encoder is not None:
        add_embed_routes(app, ctx)
    return app


def run_heads_serve(cfg: ServeConfig) -> None:
    import uvicorn

    ctx = load_heads(cfg)
    what = f"{ctx.predictor.task} model: POST /predict" if ctx.predictor is not None else "encoder: POST /embed, /rerank"
    log.info("serving %s (%s) at http://%s:%d/ (TEI routes; GET /info)", cfg.run, what, cfg.host, cfg.port)
    try:
        uvicorn.run(create_heads_app(ctx, cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                    timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        log.info("stopped")
