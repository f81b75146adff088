"""The HTTP layer: OpenAI-compatible completions, model list, health, and the playground.

Routes:
- ``POST /v1/completions``: the legacy completions API, JSON or server-sent events
  (``stream: true``; ``data: {chunk}`` lines ending with ``data: [DONE]``).
- ``POST /v1/embeddings``: mean-pooled, normalised vectors (``serve/embeddings.py``).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
- ``GET /health``: liveness, limits and engine counters (no key needed).
- ``GET /``: the web playground (``static/``; no external resources, so it works offline).

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status, as
the OpenAI API answers, so clients raise their usual exceptions. A request holds one of
``max_concurrent`` slots from validation until its response ends, however it ends: a client
that disconnects cancels its rows in the engine and frees the slot at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pilelm.inference.embed import TextEncoder
from pilelm.inference.sampling import SamplingParams
from pilelm.serve.config import ServeConfig
from pilelm.serve.embeddings import add_embeddings_route
from pilelm.serve.engine import Engine, Event, Failed, Finished, RowSpec, Submission, TextDelta
from pilelm.serve.schemas import (
    APIError,
    CompletionRequest,
    StreamOptions,
    parse_completion_request,
    parse_json_body,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default when max_tokens is omitted
DISCONNECT_POLL_S = 0.25
# Prompts longer than this are tokenized in a worker thread so the event loop stays responsive.
INLINE_TOKENIZE_CHARS = 4096  # how often a non-streaming request checks that its client is still there


class _Slots:
    """Requests in flight, limited to ``limit`` (only touched from the event loop)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(
                429,
                f"too many concurrent requests: the server takes {self.limit} at a time; retry shortly",
                type="rate_limit_error",
                code="too_many_concurrent_requests",
                headers={"Retry-After": "1"},
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class _EventStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (finished, client gone,
    or never started because the client left first)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(engine: Engine, cfg: ServeConfig, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; starting and stopping the engine is the caller's."""
    name = model_name or cfg.model_name or Path(cfg.run).name or "pilelm"
    created = int(time.time())
    max_context = engine.block_size
    max_prompt = min(cfg.max_prompt_tokens or max_context - 1, max_context - 1)
    max_tokens = min(cfg.max_tokens, max_context - 1)
    slots = _Slots(cfg.max_concurrent)
    api_key = cfg.resolved_api_key()

    app = FastAPI(title="pilelm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.slots = slots

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

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key; send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "pilelm",
                "max_model_len": max_context}

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "auth": api_key is not None,
            "limits": {
                "context": max_context,
                "max_prompt_tokens": max_prompt,
                "max_tokens": max_tokens,
                "max_concurrent": cfg.max_concurrent,
                "max_batch": engine.max_batch,
            },
            "active_requests": slots.active,
            "batching": "continuous" if engine.continuous else "static",
            "engine": engine.snapshot(),
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    def check_model(model_id: str | None) -> None:
        if model_id is not None and model_id != name:
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")

    def completion_budget(req: CompletionRequest, prompts: list[list[int]]) -> int:
        """max_new_tokens for the request's rows, or an error if it breaks a limit."""
        for ids in prompts:
            if len(ids) > max_prompt:
                raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt}",
                               param="prompt", code="context_length_exceeded")
        longest = max(max(len(ids), 1) for ids in prompts)  # an empty prompt starts from eos
        if req.max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, max_tokens, max_context - longest)
        if req.max_tokens > max_tokens:
            raise APIError(400, f"max_tokens is {req.max_tokens}; this server allows at most {max_tokens}",
                           param="max_tokens")
        if longest + req.max_tokens > max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {max_context} tokens, however you requested "
                f"{longest + req.max_tokens} tokens ({longest} in your prompt; {req.max_tokens} for the "
                "completion). Please reduce your prompt or completion length.",
                param="max_tokens", code="context_length_exceeded",
            )
        return req.max_tokens

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        req = parse_completion_request(parse_json_body(await _read_body(request, cfg.max_request_bytes)))
        check_model(req.model)
        n_prompts = len(req.prompts())
        if n_prompts * req.n > engine.max_batch:  # checked before any work is done for the rows
            raise APIError(400, f"{n_prompts} prompt(s) x n={req.n} asks for {n_prompts * req.n} completions; "
                                f"this server makes at most {engine.max_batch} per request", param="n")
        if _prompt_chars(req) > INLINE_TOKENIZE_CHARS:
            prompts = await run_in_threadpool(_prompt_ids, req, engine)
        else:
            prompts = _prompt_ids(req, engine)
        rows = _rows(req, prompts, completion_budget(req, prompts))
        echo = [_echo_text(req, engine, p) for p in range(len(prompts))] if req.echo else None
        completion = _Completion(
            rid=f"cmpl-{uuid.uuid4().hex}", model=name, n=req.n, n_rows=len(rows),
            prompt_tokens=sum(len(ids) for ids in prompts), echo=echo,
        )
        slots.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = Submission(rows, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))

        def close() -> None:
            job.cancel()  # no-op for finished rows; drops running or waiting ones
            slots.release()

        try:
            engine.submit(job)
        except RuntimeError as e:
            close()
            raise APIError(503, str(e), type="server_error") from None
        if req.stream:
            opts = req.stream_options or StreamOptions()
            return _EventStream(completion.sse(queue, opts.include_usage, opts.continuous_usage_stats),
                                on_close=close)
        try:
            return JSONResponse(await completion.collect(queue, request))
        finally:
            close()

    add_embeddings_route(app, TextEncoder(engine.model, engine.model.cfg, engine.tokenizer, device=engine.device),
                         name, check_key, check_model, slots, cfg.max_request_bytes, _read_body,
                         engine.max_batch, engine.batch_window_s)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _prompt_ids(req: CompletionRequest, engine: Engine) -> list[list[int]]:
    prompts = req.prompts()
    if isinstance(prompts[0], str):
        ids = [engine.tokenizer.encode(p) for p in prompts]  # type: ignore[arg-type]
    else:
        ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        bad = [t for p in ids for t in p if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})",
                           param="prompt")
    if engine.eos_id is None and any(not p for p in ids):
        raise APIError(400, "an empty prompt needs an end-of-text token, which this tokenizer lacks",
                       param="prompt")
    return ids


def _rows(req: CompletionRequest, prompts: list[list[int]], max_new_tokens: int) -> list[RowSpec]:
    """One row per prompt and choice, in the response's order; choice i of a seeded request
    samples with seed + i so the choices differ."""
    stop = req.stop_strings()
    return [
        RowSpec(
            index=p * req.n + j,
            prompt=ids,
            params=SamplingParams(
                max_new_tokens=max_new_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                repetition_penalty=req.repetition_penalty, stop=stop,
                seed=None if req.seed is None else req.seed + p * req.n + j,
            ),
        )
        for p, ids in enumerate(prompts)
        for j in range(req.n)
    ]


def _prompt_chars(req: CompletionRequest) -> int:
    return sum(len(p) for p in req.prompts())


def _echo_text(req: CompletionRequest, engine: Engine, index: int) -> str:
    p = req.prompts()[index]
    return p if isinstance(p, str) else engine.tokenizer.decode(p)


class _Completion:
    """Turns engine events of one request into an OpenAI response or its event stream."""

    def __init__(self, rid: str, model: str, n: int, n_rows: int, prompt_tokens: int, echo: list[str] | None):
        self.id = rid
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.n_rows = n_rows
        self.prompt_tokens = prompt_tokens
        self.echo = echo
        self.texts = [echo[i // n] if echo else "" for i in range(n_rows)]
        self.tokens = [0] * n_rows
        self.finish: list[str | None] = [None] * n_rows

    def usage(self) -> dict[str, int]:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def _apply(self, ev: Event) -> None:
        if isinstance(ev, Failed):
            raise APIError(500, ev.message, type="server_error")
        self.tokens[ev.index] = ev.tokens
        if isinstance(ev, TextDelta):
            self.texts[ev.index] += ev.text
        elif isinstance(ev, Finished):
            self.finish[ev.index] = ev.reason

    def _done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def collect(self, queue: asyncio.Queue[Event], request: Request) -> dict[str, Any]:
        while not self._done():
            try:
                ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client closed the request") from None
                continue
            self._apply(ev)
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [
                {"index": i, "text": self.texts[i], "logprobs": None, "finish_reason": self.finish[i]}
                for i in range(self.n_rows)
            ],
            "usage": self.usage(),
        }

    def _chunk(self, index: int | None, text: str = "", finish: str | None = None,
               usage: dict[str, int] | None = None) -> str:
        choices = [] if index is None else [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        ]
        body: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, queue: asyncio.Queue[Event], include_usage: bool, continuous: bool) -> AsyncIterator[str]:
        if self.echo:
            for i in range(self.n_rows):
                yield self._chunk(i, self.echo[i // self.n], usage=self.usage() if continuous else None)
        while not self._done():
            ev = await queue.get()
            try:
                self._apply(ev)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            usage = self.usage() if continuous else None
            if isinstance(ev, TextDelta):
                yield self._chunk(ev.index, ev.text, usage=usage)
            else:
                yield self._chunk(ev.index, finish=self.finish[ev.index], usage=usage)
        if include_usage:
            yield self._chunk(None, usage=self.usage())
        yield "data: [DONE]\n\n"
