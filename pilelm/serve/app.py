"""The HTTP app: routes, OpenAI-style errors, model list, health, and the playground.

Routes:
- ``POST /v1/completions``: the legacy completions API with ``logprobs`` and ``echo``
  (``completions.py``), JSON or server-sent events (``stream: true``; ``data: {chunk}`` lines
  ending with ``data: [DONE]``).
- ``POST /v1/chat/completions``: chat messages through the tokenizer's chat template (``chat.py``).
- ``POST /v1/embeddings``: mean-pooled, normalised vectors (``embeddings.py``).
- ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: the served tokenizer, as
  vLLM answers them (``tokenizer_routes.py``; lm-evaluation-harness tokenizes through them).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
- ``GET /health``: liveness, limits and engine counters (no key needed).
- ``GET /``: the web playground (``static/``; no external resources, so it works offline).

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status, as
the OpenAI API answers, so clients raise their usual exceptions; a server error says only that
(the details go to the server log). What a generation request goes through (limits, slots,
events to responses) is ``respond.py``; what a web page may ask is ``browser_guard.py``. Each
endpoint module registers its routes with one ``add_*_routes(app, ctx)``, listed in ``ROUTES``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pilelm.serve.browser_guard import BrowserGuard, BrowserGuardMiddleware
from pilelm.serve.chat import add_chat_routes
from pilelm.serve.completions import add_completions_routes
from pilelm.serve.config import ServeConfig
from pilelm.serve.embeddings import add_embeddings_routes
from pilelm.serve.engine import Engine
from pilelm.serve.respond import ServeContext, Slots
from pilelm.serve.schemas import APIError
from pilelm.serve.tokenizer_routes import add_tokenizer_routes
from pilelm.tokens.chat import load_chat_template, load_special_tokens

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

ROUTES: list[Callable[[FastAPI, ServeContext], None]] = [
    add_completions_routes, add_chat_routes, add_tokenizer_routes, add_embeddings_routes,
]
"""How an endpoint module registers its routes: ``add_*_routes(app, ctx)``, one per module,
listed here (``ServeContext`` holds what routes check and share: key, model, limits, slots)."""


def create_app(engine: Engine, cfg: ServeConfig, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; starting and stopping the engine is the caller's."""
    name = model_name or cfg.model_name or Path(cfg.run).name or "pilelm"
    created = int(time.time())
    tokenizer_dir = Path(getattr(engine.tokenizer, "source", "") or "-")  # a run's tokenizer/ folder
    request_work = cfg.max_request_work or engine.max_batch * engine.block_size
    ctx = ServeContext(engine, cfg, name, Slots(cfg.max_concurrent, cfg.max_work_in_flight or 4 * request_work),
                       cfg.resolved_api_key(),
                       chat_template=load_chat_template(tokenizer_dir) if tokenizer_dir.is_dir() else None,
                       special_tokens=_special_tokens(engine.tokenizer, tokenizer_dir))

    app = FastAPI(title="pilelm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.slots = ctx.slots
    app.add_middleware(BrowserGuardMiddleware, guard=BrowserGuard(cfg.host, cfg.allow_origin))
    if cfg.allow_origin:  # pages of these origins may read the API's answers (CORS)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allow_origin), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, "internal server error; see the server log", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "pilelm",
                "max_model_len": ctx.max_context}

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "auth": ctx.api_key is not None,
            "limits": {
                "context": ctx.max_context,
                "max_prompt_tokens": ctx.max_prompt,
                "max_tokens": ctx.max_tokens,
                "max_concurrent": cfg.max_concurrent,
                "max_batch": engine.max_batch,
                "max_request_work": ctx.max_request_work,
                "max_work_in_flight": ctx.slots.max_work,
            },
            "active_requests": ctx.slots.active,
            "work_in_flight": ctx.slots.work,
            "batching": "continuous" if engine.continuous else "static",
            "engine": engine.snapshot(),
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        ctx.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        ctx.check_key(request)
        ctx.check_model(model_id)
        return model_card()

    for add_routes in ROUTES:
        add_routes(app, ctx)
    return app


def _special_tokens(tokenizer: Any, tokenizer_dir: Path) -> dict[str, str]:
    """What a chat template sees as bos_token, eos_token, ...: the tokenizer's own, and those
    its tokenizer_config.json names (an imported tokenizer's bos_token, say)."""
    own = tokenizer.special_tokens_map() if hasattr(tokenizer, "special_tokens_map") else {}
    return {**own, **(load_special_tokens(tokenizer_dir) if tokenizer_dir.is_dir() else {})}
