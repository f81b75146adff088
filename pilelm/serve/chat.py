"""``POST /v1/chat/completions``: the OpenAI chat completions API
(https://platform.openai.com/docs/api-reference/chat/create), JSON or server-sent
``chat.completion.chunk`` events ending with ``data: [DONE]``.

The messages are rendered into one prompt by the tokenizer's chat template, or, for a base
model's tokenizer that has none, by the plain ``User:`` / ``Assistant:`` transcript
(``pilelm.tokens.chat``, the renderer fine-tuning uses too); with the plain template the reply
also ends where the model starts the user's next turn (``DEFAULT_CHAT_STOP``). Messages are
``{"role", "content", "name"?}`` with role system, developer, user or assistant and content a
string or a list of ``{"type": "text", "text"}`` parts (joined with newlines, as vLLM does);
anything else is a 400 naming the message. Sampling, ``stop``, ``n``, ``seed``, streaming,
auth, limits and errors are the completions API's; ``max_completion_tokens`` (or the older
``max_tokens``) bounds the reply; ``logprobs: true`` with ``top_logprobs: k`` returns the
reply's token log-probabilities. Tools, and response formats other than text, are refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from pilelm.inference.textstream import TextTokenizer
from pilelm.serve.engine import Finished, PromptLogprobs, RowSpec, TextDelta
from pilelm.serve.logprobs import chat_logprobs
from pilelm.serve.respond import Result, ServeContext, choice_rows
from pilelm.serve.schemas import (
    MAX_LOGPROBS,
    APIError,
    GenerationFields,
    parse_request,
    refuse_unsupported,
)
from pilelm.tokens.chat import DEFAULT_CHAT_STOP, encode_chat

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "name"}


class ChatCompletionRequest(GenerationFields):
    messages: list[Any]  # checked by check_messages, whose errors name the message
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # the older name of max_completion_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # Accepted only at their neutral values.
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        refuse_unsupported({
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "response_format": self.response_format not in (None, {"type": "text"}),
        })
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        self.check_common()


def parse_chat_request(body: Any) -> tuple[ChatCompletionRequest, list[dict[str, str]]]:
    """The request and its messages, checked and normalised to ``{"role", "content", "name"?}``."""
    req = parse_request(ChatCompletionRequest, body)
    req.check_supported()
    return req, check_messages(req.messages)


def check_messages(messages: list[Any]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", param="messages")
        extra = sorted(set(m) - MESSAGE_FIELDS)
        if extra:
            raise APIError(400, f"{where}: unsupported field {extra[0]!r} (a message has role, content and name)",
                           param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param="messages")
        message = {"role": role, "content": _content_text(m.get("content"), where)}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise APIError(400, f"{where}.name must be a string", param="messages")
            message["name"] = m["name"]
        out.append(message)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    raise APIError(400, f"{where}.content must be a string or a non-empty list of "
                        '{"type": "text", "text": ...} parts', param="messages")


async def chat_prompt_ids(ctx: ServeContext, messages: list[dict[str, str]], add_generation_prompt: bool = True
                          ) -> list[int]:
    """The messages as prompt token ids, through the served tokenizer's chat template: rendered
    in a worker thread (the event loop never runs template code) within the configured time and
    size limits, with text of the messages encoded as text (``pilelm.tokens.chat.encode_chat``:
    only the template's own markers are special tokens). Any failure of the template is a 400."""
    cfg = ctx.cfg
    work = functools.partial(encode_chat, ctx.engine.tokenizer, messages, ctx.chat_template, add_generation_prompt,
                             ctx.special_tokens, cfg.template_timeout_s, cfg.template_max_chars)
    try:
        # The sandbox stops itself at the deadline; the wait's own limit covers template code
        # that never reaches a check (a loop over a list doing nothing): the thread is left behind.
        return await asyncio.wait_for(run_in_threadpool(work), timeout=2 * cfg.template_timeout_s + 1)
    except jinja2.TemplateError as e:
        raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
    except TimeoutError:
        raise APIError(400, f"the chat template took longer than {cfg.template_timeout_s:g} s on these messages",
                       param="messages") from None
    except Exception as e:  # template code can raise anything (1/0, 'a' + 1): the messages' problem
        log.warning("the chat template failed: %s: %s", type(e).__name__, e)
        raise APIError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                       param="messages") from None


def add_chat_routes(app: FastAPI, ctx: ServeContext) -> None:
    engine = ctx.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, messages = parse_chat_request(await ctx.read_json(request))
        ctx.check_model(req.model)
        ctx.check_choices(1, req.n)
        prompt = await chat_prompt_ids(ctx, messages)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = ctx.budget(req.max_completion_tokens or req.max_tokens, [prompt], param, "messages")
        stop = req.stop_strings() + (DEFAULT_CHAT_STOP if ctx.chat_template is None else [])
        params = req.sampling_params(budget, stop, (req.top_logprobs or 0) if req.logprobs else None)
        rows = choice_rows([prompt], req.n, params)
        result = ChatResult(f"chatcmpl-{uuid.uuid4().hex}", ctx.model_name, rows, len(prompt), engine.tokenizer,
                            req.logprobs)
        return await ctx.respond(request, rows, result, req.stream, req.stream_options)


class ChatResult(Result):
    """``chat.completion`` choices: the assistant's message, logprobs, finish reason."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, rows: list[RowSpec], prompt_tokens: int, tokenizer: TextTokenizer,
                 logprobs: bool):
        super().__init__(rid, model, rows, prompt_tokens)
        self.tokenizer = tokenizer
        self.want_logprobs = logprobs

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        return {"content": chat_logprobs(self.tokenizer, entries)} if self.want_logprobs else None

    def choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": self.texts[index]},
                "logprobs": self._logprobs(self.logprobs[index]), "finish_reason": self.finish[index]}

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.rows))]

    def chunk_choice(self, ev: TextDelta | PromptLogprobs | Finished) -> dict[str, Any] | None:
        if isinstance(ev, TextDelta):
            return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": self._logprobs(ev.logprobs),
                    "finish_reason": None}
        if isinstance(ev, Finished):
            return {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.reason}
        return None  # chat does not score the prompt
