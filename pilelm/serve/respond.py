"""One generation request's life on the server, shared by completions and chat completions:
the checks every route makes, submitting its rows to the engine, and turning the engine's
events into an OpenAI JSON response or server-sent event stream.

``ServeContext`` holds what the routes check (API key, model name, limits, the concurrency
slots) and ``respond`` runs a request's rows. ``Result`` gathers each choice's text, finish
reason, token count and log-probabilities from the events and writes the envelope both APIs
share (id, created, model, usage; chunks ending with ``data: [DONE]``); ``completions.py`` and
``chat.py`` subclass it to write their choices.

A request holds one of ``max_concurrent`` slots from submission until its response ends,
however it ends: a client that disconnects, streaming or not, cancels its rows in the engine
and frees the slot at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pilelm.inference.logprobs import TokenLogprob
from pilelm.inference.sampling import SamplingParams
from pilelm.serve.config import ServeConfig
from pilelm.serve.engine import (
    Engine,
    Event,
    Failed,
    Finished,
    PromptLogprobs,
    RowSpec,
    Submission,
    TextDelta,
)
from pilelm.serve.schemas import APIError, StreamOptions, parse_json_body

DEFAULT_MAX_TOKENS = SamplingParams().max_new_tokens  # 16, the OpenAI completions default when max_tokens is omitted


class Slots:
    """Requests in flight, limited to ``limit`` requests and ``max_work`` token units of work
    together (only touched from the event loop)."""

    def __init__(self, limit: int, max_work: int = 0):
        self.limit = limit
        self.max_work = max_work
        """0: no limit on the work in flight."""
        self.active = 0
        self.work = 0

    def acquire(self, work: int = 0) -> None:
        """Take a slot for a request of ``work`` token units, or refuse with 429 (a request
        alone is always taken: the per-request limit bounds it)."""
        if self.active >= self.limit:
            raise _busy(f"too many concurrent requests: the server takes {self.limit} at a time; retry shortly",
                        "too_many_concurrent_requests")
        if self.max_work and self.active and self.work + work > self.max_work:
            raise _busy(f"the server is at its limit of work in flight ({self.work} of {self.max_work} token "
                        f"units; this request needs {work}); retry shortly", "too_much_work_in_flight")
        self.active += 1
        self.work += work

    def release(self, work: int = 0) -> None:
        self.active -= 1
        self.work -= work


def _busy(message: str, code: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": "1"})


class EventStream(StreamingResponse):
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


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    return bytes(body)


@dataclass
class ServeContext:
    """What every route checks: the key, the model name, the limits, the concurrency slots."""

    engine: Engine
    cfg: ServeConfig
    model_name: str
    slots: Slots
    api_key: str | None
    chat_template: str | None = None
    """The tokenizer's chat template; None: ``pilelm.tokens.chat.DEFAULT_CHAT_TEMPLATE``."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """bos_token, eos_token, ... as the chat template sees them."""

    @property
    def max_context(self) -> int:
        return self.engine.block_size

    @property
    def max_prompt(self) -> int:
        return min(self.cfg.max_prompt_tokens or self.max_context - 1, self.max_context - 1)

    @property
    def max_tokens(self) -> int:
        return min(self.cfg.max_tokens, self.max_context - 1)

    @property
    def max_request_work(self) -> int:
        return self.cfg.max_request_work or self.engine.max_batch * self.max_context

    def check_work(self, work: int, param: str) -> None:
        """Refuse a request of more than ``max_request_work`` token units, naming ``param``."""
        if work > self.max_request_work:
            raise APIError(400, f"this request asks for {work} token units of work (choices x (prompt + "
                                f"max_tokens), x (2 + logprobs) with log-probabilities; embedding input tokens); "
                                f"this server takes at most {self.max_request_work} per request", param=param)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key; send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, model_id: str | None) -> None:
        if model_id is not None and model_id != self.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, after the key check and the size limit."""
        self.check_key(request)
        return parse_json_body(await read_body(request, self.cfg.max_request_bytes))

    def check_choices(self, n_prompts: int, n: int) -> None:
        """Refuse, before any work, a request for more completions than one batch holds."""
        if n_prompts * n > self.engine.max_batch:
            raise APIError(400, f"{n_prompts} prompt(s) x n={n} asks for {n_prompts * n} completions; "
                                f"this server makes at most {self.engine.max_batch} per request", param="n")

    def encode_text(self, text: str) -> list[int]:
        """The ids of text from a request, taken as text: a special token's string in it
        (``<|endoftext|>``) encodes as ordinary characters (``PileTokenizer.encode_plain``);
        send token ids to put special tokens in a prompt."""
        tokenizer = self.engine.tokenizer
        encode_plain = getattr(tokenizer, "encode_plain", None)
        return encode_plain(text) if encode_plain is not None else tokenizer.encode(text)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size})",
                           param=param)

    def budget(self, requested: int | None, prompts: list[list[int]], param: str = "max_tokens",
               prompt_param: str = "prompt") -> int:
        """max_new_tokens for the request's rows, or an error if it breaks a limit (naming
        ``param`` or ``prompt_param``, the request's fields)."""
        for ids in prompts:
            if len(ids) > self.max_prompt:
                raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {self.max_prompt}",
                               param=prompt_param, code="context_length_exceeded")
        if self.engine.eos_id is None and any(not p for p in prompts):
            raise APIError(400, "an empty prompt needs an end-of-text token, which this tokenizer lacks",
                           param=prompt_param)
        longest = max(max(len(ids), 1) for ids in prompts)  # an empty prompt starts from eos
        context = self.max_context
        if requested is None:
            return min(DEFAULT_MAX_TOKENS, self.max_tokens, context - longest)
        if requested > self.max_tokens:
            raise APIError(400, f"{param} is {requested}; this server allows at most {self.max_tokens}", param=param)
        if longest + requested > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, however you requested "
                f"{longest + requested} tokens ({longest} in your prompt; {requested} for the "
                "completion). Please reduce your prompt or completion length.",
                param=param, code="context_length_exceeded",
            )
        return requested

    async def respond(self, request: Request, rows: list[RowSpec], result: Result, stream: bool,
                      stream_options: StreamOptions | None) -> Response:
        """Submit ``rows`` and answer with ``result``'s JSON or event stream (a request over
        the per-request work limit is a 400; one that would pass the work in flight, a 429)."""
        work = sum(row_work(r) for r in rows)
        self.check_work(work, "logprobs" if any(r.params.logprobs is not None for r in rows) else "max_tokens")
        self.slots.acquire(work)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = Submission(rows, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))

        def close() -> None:
            job.cancel()  # no-op for finished rows; drops running or waiting ones
            self.slots.release(work)

        try:
            self.engine.submit(job)
        except RuntimeError as e:
            close()
            raise APIError(503, str(e), type="server_error") from None
        if stream:
            opts = stream_options or StreamOptions()
            return EventStream(result.sse(queue, opts.include_usage, opts.continuous_usage_stats), on_close=close)
        try:
            return JSONResponse(await result.collect(queue, request))
        finally:
            close()


def row_work(row: RowSpec) -> int:
    """A row's work in token units: its prompt and completion tokens, times 2 + k when it asks
    for log-probabilities with k alternatives (the token, its log-probability and k more per
    position; what its response holds)."""
    p = row.params
    k = max(-1 if p.logprobs is None else p.logprobs, -1 if p.prompt_logprobs is None else p.prompt_logprobs)
    return (max(len(row.prompt), 1) + p.max_new_tokens) * (1 if k < 0 else 2 + k)


def choice_rows(prompts: list[list[int]], n: int, params: SamplingParams) -> list[RowSpec]:
    """One row per prompt and choice, in the response's order; choice i of a seeded request
    samples with seed + i so the choices differ."""
    seed = params.seed
    return [
        RowSpec(p * n + j, ids, dataclasses.replace(params, seed=None if seed is None else seed + p * n + j))
        for p, ids in enumerate(prompts)
        for j in range(n)
    ]


class Result:
    """The choices of one request as the engine's events fill them in; subclasses write the
    API's choice objects (``choice``, ``chunk_choice``, ``opening``)."""

    object = ""  # the response's "object"
    chunk_object = ""  # a stream chunk's "object"

    def __init__(self, rid: str, model: str, rows: list[RowSpec], prompt_tokens: int):
        self.id = rid
        self.model = model
        self.created = int(time.time())
        self.rows = sorted(rows, key=lambda r: r.index)
        self.prompt_tokens = prompt_tokens
        n_rows = len(rows)
        self.texts = [""] * n_rows
        self.tokens = [0] * n_rows
        self.finish: list[str | None] = [None] * n_rows
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n_rows)]
        self.prompt_logprobs: list[list[TokenLogprob | None] | None] = [None] * n_rows

    def usage(self) -> dict[str, int]:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    # -- what subclasses write --------------------------------------------------------------

    def choice(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, ev: TextDelta | PromptLogprobs | Finished) -> dict[str, Any] | None:
        """The choice object of one event's stream chunk; None sends no chunk."""
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        """Choice objects sent before any event (the chat role, echoed prompts)."""
        return []

    # -- shared -----------------------------------------------------------------------------

    def _apply(self, ev: Event) -> None:
        if isinstance(ev, Failed):
            raise APIError(ev.status, ev.message, type="server_error" if ev.status >= 500 else "invalid_request_error")
        if isinstance(ev, PromptLogprobs):
            self.prompt_logprobs[ev.index] = ev.logprobs
            return
        self.tokens[ev.index] = ev.tokens
        if isinstance(ev, TextDelta):
            self.texts[ev.index] += ev.text
            self.logprobs[ev.index] += ev.logprobs
        else:
            self.finish[ev.index] = ev.reason

    def _done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def collect(self, queue: asyncio.Queue[Event], request: Request) -> dict[str, Any]:
        # Watch for the client leaving while events arrive (they may never pause): the request
        # ends, and its rows are cancelled, the moment the disconnect message comes.
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while not self._done():
                event = asyncio.ensure_future(queue.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise APIError(499, "client closed the request")
                self._apply(event.result())
        finally:
            gone.cancel()
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i) for i in range(len(self.rows))], "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": self.chunk_object, "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self, queue: asyncio.Queue[Event], include_usage: bool, continuous: bool) -> AsyncIterator[str]:
        for choice in self.opening():
            yield self._chunk([choice], self.usage() if continuous else None)
        while not self._done():
            ev = await queue.get()
            try:
                self._apply(ev)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            assert not isinstance(ev, Failed)
            choice = self.chunk_choice(ev)
            if choice is not None:
                yield self._chunk([choice], self.usage() if continuous else None)
        if include_usage:
            yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
