"""``POST /v1/embeddings``: OpenAI-compatible embeddings of the served model.

Request (https://platform.openai.com/docs/api-reference/embeddings/create): ``input`` is a
string, a list of strings, a list of token ids or a list of token-id lists (at most 2048
inputs, each non-empty and within the context); ``encoding_format`` ``float`` (a list of
numbers) or ``base64`` (the little-endian float32 bytes, what the official Python client asks
for and decodes); ``dimensions`` is not supported (the vectors are the model's width).

The vectors are the mean-pooled final hidden states, L2-normalised (``inference/text_encoder.py``,
the same code as ``pilelm embed``). Requests arriving together are batched: a worker thread
collects inputs for ``batch_window_s`` (up to ``max_batch`` sequences) and embeds them in one
forward pass per batch. Auth, the concurrency slots and errors are the completions API's.
"""

from __future__ import annotations

import asyncio
import base64
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from pilelm.inference.text_encoder import TextEncoder
from pilelm.serve.schemas import APIError, parse_json_body

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and isinstance(x[0], int):
            return [x]  # type: ignore[list-item]
        return x  # type: ignore[return-value]


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = EmbeddingRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {field}", param=field) from None
        if err["type"] == "missing":
            raise APIError(400, f"{field} is required", param=field) from None
        if field == "input":
            raise APIError(400, "input must be a string, a list of strings, a list of token ids or a list of "
                                "token-id lists", param="input") from None
        raise APIError(400, f"{field}: {err['msg']}", param=field) from None
    if req.dimensions is not None:
        raise APIError(400, "dimensions is not supported by this server (its vectors have the model's width)",
                       param="dimensions")
    n = len(req.inputs())
    if n == 0 or n > MAX_INPUTS:
        raise APIError(400, f"input must hold 1 to {MAX_INPUTS} items, got {n}", param="input")
    return req


@dataclass
class _Job:
    ids: list[list[int]]
    done: Callable[[np.ndarray | BaseException], None]


class EmbeddingBatcher:
    """Embeds the inputs of concurrent requests together, on one worker thread."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, batch_window_s: float = 0.01):
        self.encoder = encoder
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.batches = 0  # forward passes made (tests read it)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pilelm-serve-embed", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            jobs = [self._queue.get()]
            deadline = time.monotonic() + self.batch_window_s
            size = len(jobs[0].ids)
            while size < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                size += len(job.ids)
            try:
                vectors = self.encoder.embed_ids([ids for j in jobs for ids in j.ids], batch_size=self.max_batch)
                self.batches += 1
            except Exception as e:  # a failed batch fails its requests, not the worker
                for j in jobs:
                    j.done(e)
                continue
            at = 0
            for j in jobs:
                j.done(vectors[at : at + len(j.ids)])
                at += len(j.ids)


def add_embeddings_route(app: FastAPI, encoder: TextEncoder, name: str, check_key: Callable[[Request], None],
                         check_model: Callable[[str | None], None], slots: Any, max_request_bytes: int,
                         read_body: Callable[..., Any], max_batch: int, batch_window_s: float) -> EmbeddingBatcher:
    """Register ``POST /v1/embeddings`` on ``app``; returns its batcher."""
    batcher = EmbeddingBatcher(encoder, max_batch, batch_window_s)
    app.state.embeddings = batcher

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        check_key(request)
        req = parse_embedding_request(parse_json_body(await read_body(request, max_request_bytes)))
        check_model(req.model)
        ids = _input_ids(req, encoder)
        slots.acquire()
        try:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[np.ndarray] = loop.create_future()

            def done(result: np.ndarray | BaseException) -> None:
                def settle() -> None:
                    if fut.done():
                        return
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)

                loop.call_soon_threadsafe(settle)

            batcher.submit(_Job(ids, done))
            try:
                vectors = await fut
            except Exception as e:
                raise APIError(500, f"embedding failed: {e}", type="server_error") from None
        finally:
            slots.release()
        tokens = sum(len(x) for x in ids)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return batcher


def _input_ids(req: EmbeddingRequest, encoder: TextEncoder) -> list[list[int]]:
    inputs = req.inputs()
    if isinstance(inputs[0], str):
        ids = encoder.tokenize(inputs)  # type: ignore[arg-type]
    else:
        ids = [list(x) for x in inputs]  # type: ignore[arg-type]
        vocab = int(encoder.model_cfg.vocab_size)
        bad = [t for x in ids for t in x if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="input")
    for i, x in enumerate(ids):
        if not x:
            raise APIError(400, f"input[{i}] is empty: nothing to embed", param="input")
        if len(x) > encoder.max_tokens:
            raise APIError(400, f"input[{i}] is {len(x)} tokens; this model embeds at most {encoder.max_tokens}",
                           param="input", code="context_length_exceeded")
    return ids


def _encode(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in v]
