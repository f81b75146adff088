"""``ServeConfig``: the settings of ``pilelm serve`` (model, address, key, limits, batching)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from pilelm.core.config import require_at_least

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
    insecure_no_key: bool = False
    """Serve on a non-loopback address without an API key (refused otherwise: anyone who can reach the port could use the model)."""
    allow_origin: list[str] = field(default_factory=list)
    """Web origins (e.g. http://localhost:3000) whose pages may call the API from a browser (CORS), and whose host names are accepted in the Host header; '*' = any page and any Host (turns the browser checks off). Empty: only the playground this server serves."""
    model_name: str = ""
    """Model id in /v1/models and responses; empty = the run directory's name."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, mps."""
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
    max_request_work: int = 0
    """Most work one request may ask for, in token units: each choice's prompt plus max_tokens, times 2 + logprobs when it asks for log-probabilities (each scored token carries that many numbers); an embeddings request's input tokens. Bounds the work and the response of one request (a 400 above). 0 = max_batch x the model's context (one full batch)."""
    max_work_in_flight: int = 0
    """Most token units (as max_request_work counts them) all requests in flight may hold together, which bounds the server's memory; a request that would pass it is refused with 429 until others end (one request alone is always taken). 0 = 4 x max_request_work."""
    template_timeout_s: float = 1.0
    """Longest a chat template may render one request's messages (a 400 past it; the template comes with the model and may be hostile)."""
    template_max_chars: int = 1_000_000
    """Longest text a chat template may render, or build on the way (a 400 past it)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """uvicorn's log level (access log at info)."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; omit it to serve without a key")
        require_at_least(self, 1, ("max_tokens", "max_concurrent", "max_batch", "max_request_bytes",
                                  "template_max_chars"))
        if self.template_timeout_s <= 0:
            raise ValueError(f"template_timeout_s must be > 0, got {self.template_timeout_s}")
        if self.max_request_work < 0 or self.max_work_in_flight < 0:
            raise ValueError("max_request_work and max_work_in_flight must be >= 0 (0 = automatic)")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0 (0 = the model's context), got {self.max_prompt_tokens}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch default), got {self.threads}")

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
