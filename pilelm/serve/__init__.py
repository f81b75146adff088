"""Serving: an OpenAI-compatible HTTP API with request batching, and a web playground.

``pilelm serve RUN_DIR`` loads the run's latest checkpoint and serves
``POST /v1/completions`` (streaming or not), ``GET /v1/models``, ``GET /health`` and the
playground at ``/``. Modules, each importing only those before it: ``config`` (ServeConfig),
``schemas`` (request validation), ``engine`` (the batching scheduler; token ids to streamed
text is ``pilelm.inference.textstream``), ``app`` (HTTP routes and OpenAI-style errors),
``server`` (model loading, uvicorn), ``static/`` (the playground).
"""

from pilelm.serve.app import create_app
from pilelm.serve.config import ServeConfig
from pilelm.serve.engine import Engine
from pilelm.serve.server import BackgroundServer, load_engine, run_serve

__all__ = ["BackgroundServer", "Engine", "ServeConfig", "create_app", "load_engine", "run_serve"]
