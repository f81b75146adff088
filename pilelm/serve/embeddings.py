"""``POST /v1/embeddings``: OpenAI-compatible embeddings of the served model.

Request (https://platform.openai.com/docs/api-reference/embeddings/create): ``input`` is a
string, a list of strings, a list of token ids or a list of token-id lists (at most 2048
inputs, each non-empty and within the context); ``encoding_format`` ``float`` (a list of
numbers) or ``base64`` (the little-endian float32 bytes, what the official Python client asks
for and decodes); ``dimensions`` is not supported (the vectors are the model's width).

The vectors are the mean-pooled final hidden states, L2-normalised (``inference/text_encoder.py``,
the same code as ``pilelm embed``). Requests arriving together are batched: a worker thread
collects inputs for ``batch_window_s`` (up to ``max_batch`` sequences) and embeds them in
forward passes of at most ``max_batch`` inputs, taking one input from each request in turn. A
client that disconnects cancels its request: the inputs not yet embedded are dropped (an
abandoned 2048-input request does not pin the server). Text inputs are encoded as text
(special-token strings in them are not special tokens). Auth, the concurrency slots, the limits
on work per request and in flight, and errors are the completions API's (``respond.py``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from pilelm.inference.text_encoder import TextEncoder
from pilelm.serve.respond import ServeContext, disconnected
from pilelm.serve.schemas import APIError

log = logging.getLogger(__name__)

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
class EmbeddingJob:
    """One request's inputs; the worker embeds them in pieces of at most ``max_batch`` and calls
    ``done`` once with all the vectors (or the error). ``cancel`` (any thread): the worker embeds
    none of its inputs not yet started."""

    ids: list[list[int]]
    done: Callable[[np.ndarray | BaseException], None]
    cancelled: bool = False
    taken: int = 0  # inputs handed to a forward pass (the worker's)
    vectors: np.ndarray | None = None

    def cancel(self) -> None:
        self.cancelled = True


class EmbeddingBatcher:
    """Embeds the inputs of concurrent requests together, on one worker thread.

    At an idle worker the first batch waits ``batch_window_s`` for more requests (or until
    ``max_batch`` inputs wait); then each forward pass takes up to ``max_batch`` inputs, one
    from each request in turn (a small request is not stuck behind a big one), and a cancelled
    request's inputs are dropped before the next pass: an abandoned big request costs at most
    the pass under way."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, batch_window_s: float = 0.01):
        self.encoder = encoder
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.batches = 0  # forward passes made (tests read it)
        self.inputs_embedded = 0
        self.inputs_dropped = 0  # inputs of cancelled requests never embedded
        self._queue: queue.Queue[EmbeddingJob] = queue.Queue()
        self._active: list[EmbeddingJob] = []  # the worker's
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        return not self._active and self._queue.empty()

    def submit(self, job: EmbeddingJob) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pilelm-serve-embed", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def _gather(self) -> None:
        """Block for a request at an idle worker, then collect what arrives within the window."""
        if not self._active:
            self._active.append(self._queue.get())
            deadline = time.monotonic() + self.batch_window_s
            while sum(len(j.ids) for j in self._active) < self.max_batch:
                try:
                    self._active.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while True:  # requests that came while the last pass ran join now
            try:
                self._active.append(self._queue.get_nowait())
            except queue.Empty:
                break

    def _next_pieces(self) -> list[tuple[EmbeddingJob, int]]:
        """Up to ``max_batch`` (job, input index) pairs, one per live job in turn."""
        for job in [j for j in self._active if j.cancelled]:
            self.inputs_dropped += len(job.ids) - job.taken
            self._active.remove(job)
        pieces: list[tuple[EmbeddingJob, int]] = []
        while len(pieces) < self.max_batch:
            before = len(pieces)
            for job in self._active:
                if job.taken < len(job.ids) and len(pieces) < self.max_batch:
                    pieces.append((job, job.taken))
                    job.taken += 1
            if len(pieces) == before:
                break
        return pieces

    def _loop(self) -> None:
        while True:
            self._gather()
            pieces = self._next_pieces()
            if not pieces:
                continue
            try:
                vectors = self.encoder.embed_ids([job.ids[i] for job, i in pieces], batch_size=self.max_batch)
                self.batches += 1
                self.inputs_embedded += len(pieces)
            except Exception as e:  # a failed pass fails its requests, not the worker
                for job in {id(job): job for job, _ in pieces}.values():
                    job.cancel()
                    self._active.remove(job)
                    job.done(e)
                continue
            for (job, i), v in zip(pieces, vectors, strict=True):
                if job.vectors is None:
                    job.vectors = np.zeros((len(job.ids), len(v)), dtype=np.float32)
                job.vectors[i] = v
            for job in [j for j in self._active if j.taken == len(j.ids) and not j.cancelled]:
                self._active.remove(job)
                job.done(job.vectors)


def add_embeddings_routes(app: FastAPI, ctx: ServeContext) -> None:
    """``POST /v1/embeddings``; its batcher is ``app.state.embeddings``."""
    engine = ctx.engine
    encoder = TextEncoder(engine.model, engine.model.cfg, engine.tokenizer, device=engine.device)
    batcher = EmbeddingBatcher(encoder, engine.max_batch, engine.batch_window_s)
    app.state.embeddings = batcher

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = parse_embedding_request(await ctx.read_json(request))
        ctx.check_model(req.model)
        ids = await _input_ids(req, encoder, ctx)
        tokens = sum(len(x) for x in ids)
        ctx.check_work(tokens, "input")
        ctx.slots.acquire(tokens)
        try:
            vectors = await _embed(batcher, ids, request)
        finally:
            ctx.slots.release(tokens)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": ctx.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


async def _embed(batcher: EmbeddingBatcher, ids: list[list[int]], request: Request) -> np.ndarray:
    """The vectors of ``ids`` from the batcher; a client that goes away cancels the work (499)."""
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

    job = EmbeddingJob(ids, done)
    batcher.submit(job)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not fut.done():
            raise APIError(499, "client closed the request")
        try:
            return fut.result()
        except Exception as e:
            log.exception("embedding failed", exc_info=e)
            raise APIError(500, "embedding failed: internal server error; the server log has the details",
                           type="server_error") from None
    finally:
        job.cancel()  # no-op once done; drops the inputs not yet embedded otherwise
        gone.cancel()


# Inputs with more characters than this are tokenized in a worker thread (the event loop stays free).
INLINE_TOKENIZE_CHARS = 4096


async def _input_ids(req: EmbeddingRequest, encoder: TextEncoder, ctx: ServeContext) -> list[list[int]]:
    inputs = req.inputs()
    if isinstance(inputs[0], str):
        texts: list[str] = inputs  # type: ignore[assignment]
        if sum(len(t) for t in texts) > INLINE_TOKENIZE_CHARS:
            ids = await run_in_threadpool(lambda: [ctx.encode_text(t) for t in texts])
        else:
            ids = [ctx.encode_text(t) for t in texts]  # text is text: no special tokens from it
    else:
        ids = [list(x) for x in inputs]  # type: ignore[arg-type]
        ctx.check_token_ids([t for x in ids for t in x], "input")
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
