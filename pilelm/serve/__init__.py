"""Serving: an OpenAI-compatible HTTP API with request batching, and a web playground.

``pilelm serve RUN_DIR`` loads the run's latest checkpoint and serves
``POST /v1/completions`` (streaming or not), ``GET /v1/models``, ``GET /health`` and the
playground at ``/``. Modules: ``server`` (config, loading, uvicorn), ``app`` (HTTP routes and
OpenAI-style errors), ``schemas`` (request validation), ``engine`` (the batching scheduler),
``textstream`` (token ids to clean streamed text), ``static/`` (the playground).
"""

from pilelm.serve.app import create_app
from pilelm.serve.engine import Engine
from pilelm.serve.server import BackgroundServer, ServeConfig, load_engine, run_serve

__all__ = ["BackgroundServer", "Engine", "ServeConfig", "create_app", "load_engine", "run_serve"]
