"""``pilelm serve RUN_DIR``: load a run's model and tokenizer into an engine, build the app, run uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import torch

from pilelm.models.dtypes import DTYPES
from pilelm.models.gpt import GPT
from pilelm.serve.app import create_app
from pilelm.serve.browser_guard import is_loopback
from pilelm.serve.config import API_KEY_ENV, ServeConfig
from pilelm.serve.engine import Engine
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.training.checkpoint import load_for_inference

log = logging.getLogger(__name__)


def load_engine(cfg: ServeConfig) -> Engine:
    """The run's model (in ``cfg.dtype`` on ``cfg.device``) and tokenizer in a batching engine."""
    if not cfg.run:
        raise ValueError("serve needs a run directory: pilelm serve RUN_DIR")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, _, tok_dir = load_for_inference(cfg.run, cfg.step, cfg.device)
    if not isinstance(model, GPT):
        raise ValueError(f"{cfg.run} holds a {type(model).__name__} model; the generation engine needs "
                         "a causal language model (gpt2 or neox); `pilelm serve` serves encoders with /embed")
    model = model.to(DTYPES[cfg.dtype])
    return Engine(model, load_tokenizer(tok_dir), max_batch=cfg.max_batch, batch_window_s=cfg.batch_window_ms / 1000,
                  continuous=cfg.continuous)


def require_key_off_loopback(cfg: ServeConfig) -> None:
    """A server reachable from other machines needs an API key, unless --insecure-no-key says
    that is meant (a closed network, a proxy that authenticates)."""
    if not is_loopback(cfg.host) and cfg.resolved_api_key() is None and not cfg.insecure_no_key:
        raise ValueError(f"host={cfg.host} exposes the server beyond this machine without an API key: set "
                         f"--api-key KEY (or {API_KEY_ENV}), bind 127.0.0.1, or pass --insecure-no-key if "
                         "anyone who can reach the port may use the model")


class BackgroundServer:
    """uvicorn serving ``app`` from a thread of this process (tests, benchmarks, notebooks).

    ``port=0`` binds a free port; ``url`` is where it listens once ``start`` returns.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pilelm-serve-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    require_key_off_loopback(cfg)
    from pilelm.serve.heads_app import run_heads_serve, serves_heads

    if serves_heads(cfg.run):  # a classifier, tagger or encoder: TEI's /predict, /embed
        return run_heads_serve(cfg)
    engine = load_engine(cfg)
    app = create_app(engine, cfg)
    if not is_loopback(cfg.host) and cfg.resolved_api_key() is None:
        log.warning("serving on %s without an API key (--insecure-no-key): anyone who can reach this port "
                    "can use the model", cfg.host)
    log.info("serving %s at http://%s:%d/ (playground) and /v1/completions", cfg.run, cfg.host, cfg.port)
    engine.start()
    try:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it.
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        engine.stop()
