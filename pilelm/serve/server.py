"""``pilelm serve RUN_DIR``: load a run's model and tokenizer, start the engine, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pilelm.models.dtypes import DTYPES
from pilelm.models.gpt import GPT
from pilelm.serve.engine import Engine
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.training.checkpoint import load_for_inference

log = logging.getLogger(__name__)

API_KEY_ENV = "PILELM_API_KEY"


@dataclass
class ServeConfig:
    run: str = ""
    """Run directory to serve (pilelm train or pilelm import output)."""
    step: int | None = None
    """Checkpoint step to load; None = the latest."""
    host: str = "127.0.0.1"
    """Address to bind. The default is reachable from this machine only; 0.0.0.0 exposes the server."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on /v1/*; None = the PILELM_API_KEY environment variable, or no key when that is unset too."""
    model_name: str = ""
    """Model id in /v1/models and responses; empty = the run directory's name."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, mps)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and KV-cache dtype (bfloat16 is several times faster on CPUs with AMX)."""
    threads: int = 0
    """Torch intra-op threads; 0 = torch's default (one per core)."""
    max_prompt_tokens: int = 0
    """Longest prompt accepted, in tokens; 0 = the model's context length minus one."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for (also capped so prompt + completion fit the context)."""
    max_concurrent: int = 128
    """Requests in flight at once (streaming or not); more are refused with 429 until one ends."""
    max_batch: int = 64
    """Most completions decoded together in one forward pass (also the most one request may ask for)."""
    batch_window_ms: float = 20.0
    """At an idle server, decoding starts once no request has arrived for this long (or after 10 windows, or at max_batch rows), so requests arriving together share one prefill."""
    continuous: bool = True
    """Continuous batching: requests join the running batch at the next decode step. --no-continuous: static batching (they wait until the running batch has ended; for comparison)."""
    max_request_bytes: int = 1_000_000
    """Largest request body accepted (413 above)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """uvicorn's log level (access log at info)."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; omit it to serve without a key")
        for key in ("max_tokens", "max_concurrent", "max_batch", "max_request_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0 (0 = the model's context), got {self.max_prompt_tokens}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch default), got {self.threads}")

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def load_engine(cfg: ServeConfig) -> Engine:
    """The run's model (in ``cfg.dtype`` on ``cfg.device``) and tokenizer in a batching engine."""
    if not cfg.run:
        raise ValueError("serve needs a run directory: pilelm serve RUN_DIR")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, _, tok_dir = load_for_inference(cfg.run, cfg.step, cfg.device)
    if not isinstance(model, GPT):
        raise ValueError(f"{cfg.run} holds a {type(model).__name__} model; serve generates text with "
                         "causal language models (gpt2 or neox)")
    model = model.to(DTYPES[cfg.dtype])
    return Engine(model, load_tokenizer(tok_dir), max_batch=cfg.max_batch, batch_window_s=cfg.batch_window_ms / 1000,
                  continuous=cfg.continuous)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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

    from pilelm.serve.app import create_app

    engine = load_engine(cfg)
    app = create_app(engine, cfg)
    if not _is_loopback(cfg.host) and cfg.resolved_api_key() is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or %s)", cfg.host, API_KEY_ENV)
    log.info("serving %s at http://%s:%d/ (playground) and /v1/completions", cfg.run, cfg.host, cfg.port)
    engine.start()
    try:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it.
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        engine.stop()
