"""``POST /v1/completions``: the OpenAI legacy completions API, JSON or server-sent events.

``logprobs: k`` (0 to 20) returns each generated token's log-probability and the ``k`` most
likely tokens at its position, computed in the decode step that sampled it; with ``echo`` the
prompt comes back in front of the text and, with ``logprobs``, its own tokens are scored from
the prefill (the first one ``null``). ``max_tokens: 0`` with ``echo`` and ``logprobs`` scores a
prompt without generating: what lm-evaluation-harness's ``local-completions`` model asks
(with ``max_tokens: 1``) to compute log-likelihoods.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from pilelm.inference.textstream import TextTokenizer
from pilelm.serve.engine import Finished, PromptLogprobs, RowSpec, TextDelta
from pilelm.serve.logprobs import CompletionLogprobs
from pilelm.serve.respond import Result, ServeContext, choice_rows
from pilelm.serve.schemas import CompletionRequest, parse_completion_request

# Prompts longer than this are tokenized in a worker thread so the event loop stays responsive.
INLINE_TOKENIZE_CHARS = 4096


def add_completions_routes(app: FastAPI, ctx: ServeContext) -> None:
    engine = ctx.engine

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion_request(await ctx.read_json(request))
        ctx.check_model(req.model)
        ctx.check_choices(len(req.prompts()), req.n)
        if sum(len(p) for p in req.prompts()) > INLINE_TOKENIZE_CHARS:
            prompts = await run_in_threadpool(_prompt_ids, req, ctx)
        else:
            prompts = _prompt_ids(req, ctx)
        rows = _rows(req, prompts, ctx.budget(req.max_tokens, prompts))
        echo = [_echo_text(p, engine.tokenizer) for p in req.prompts()] if req.echo else None
        result = CompletionResult(f"cmpl-{uuid.uuid4().hex}", ctx.model_name, rows,
                                  sum(len(ids) for ids in prompts), engine.tokenizer, echo, req.n,
                                  req.logprobs is not None)
        return await ctx.respond(request, rows, result, req.stream, req.stream_options)


def _prompt_ids(req: CompletionRequest, ctx: ServeContext) -> list[list[int]]:
    prompts = req.prompts()
    if isinstance(prompts[0], str):
        return [ctx.encode_text(p) for p in prompts]  # type: ignore[arg-type]
    ids = [list(p) for p in prompts]  # type: ignore[arg-type]
    ctx.check_token_ids([t for p in ids for t in p], "prompt")
    return ids


def _rows(req: CompletionRequest, prompts: list[list[int]], max_new_tokens: int) -> list[RowSpec]:
    params = req.sampling_params(max_new_tokens, req.stop_strings(), req.logprobs,
                                 req.logprobs if req.echo else None)
    return choice_rows(prompts, req.n, params)


def _echo_text(prompt: str | list[int], tokenizer: TextTokenizer) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


class CompletionResult(Result):
    """``text_completion`` choices: text (after the echoed prompt), logprobs, finish reason."""

    object = chunk_object = "text_completion"

    def __init__(self, rid: str, model: str, rows: list[RowSpec], prompt_tokens: int, tokenizer: TextTokenizer,
                 echo: list[str] | None, n: int, logprobs: bool):
        super().__init__(rid, model, rows, prompt_tokens)
        self.echo = echo
        self.n = n
        self.want_logprobs = logprobs
        self.texts = [echo[i // n] if echo else "" for i in range(len(rows))]
        self.builders = [CompletionLogprobs(tokenizer) for _ in rows] if logprobs else None

    def choice(self, index: int) -> dict[str, Any]:
        logprobs = None
        if self.builders is not None:
            builder = self.builders[index]
            scored = self.prompt_logprobs[index]
            if scored is not None:
                builder.add(self.rows[index].prompt, scored)
            generated = self.logprobs[index]
            builder.add([e.token for e in generated], generated)
            logprobs = builder.whole
        return {"index": index, "text": self.texts[index], "logprobs": logprobs, "finish_reason": self.finish[index]}

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo or self.want_logprobs:  # with logprobs the echo goes out with the prompt's scores
            return []
        return [self._choice(i, self.echo[i // self.n]) for i in range(len(self.rows))]

    def chunk_choice(self, ev: TextDelta | PromptLogprobs | Finished) -> dict[str, Any] | None:
        builder = None if self.builders is None else self.builders[ev.index]
        if isinstance(ev, PromptLogprobs):
            assert self.echo is not None and builder is not None
            return self._choice(ev.index, self.echo[ev.index // self.n],
                                builder.add(self.rows[ev.index].prompt, ev.logprobs))
        if isinstance(ev, TextDelta):
            part = None if builder is None else builder.add([e.token for e in ev.logprobs], ev.logprobs)
            return self._choice(ev.index, ev.text, part)
        return self._choice(ev.index, "", finish=ev.reason)

    @staticmethod
    def _choice(index: int, text: str, logprobs: dict[str, Any] | None = None,
                finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
