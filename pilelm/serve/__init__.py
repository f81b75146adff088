"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web playground.

``pilelm serve RUN_DIR`` loads the run's latest checkpoint and serves ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``POST /v1/embeddings`` (JSON or server-sent events),
``POST /tokenize`` / ``/detokenize``, ``GET /tokenizer_info``, ``GET /v1/models``,
``GET /health`` and the playground at ``/``. Modules, each importing only those before it:
``config`` (ServeConfig), ``schemas`` (request validation, OpenAI-style errors), ``engine`` (the
batching scheduler; token ids to streamed text is ``pilelm.inference.textstream``), ``respond``
(``ServeContext``: the checks, limits and slots every route shares; events to responses),
``logprobs`` (their API shapes), the endpoint modules ``completions``, ``chat``,
``tokenizer_routes`` and ``embeddings`` (each registers its routes with one
``add_*_routes(app, ctx)``, listed in ``app.ROUTES``), ``browser_guard`` (what a web page may
ask), ``app`` (the app, health, models, errors), ``server`` (model loading, uvicorn),
``static/`` (the playground).
"""

from pilelm.serve.app import create_app
from pilelm.serve.config import ServeConfig
from pilelm.serve.engine import Engine
from pilelm.serve.server import BackgroundServer, load_engine, run_serve

__all__ = ["BackgroundServer", "Engine", "ServeConfig", "create_app", "load_engine", "run_serve"]
