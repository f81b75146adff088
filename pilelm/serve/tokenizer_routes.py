"""The served tokenizer over HTTP, in vLLM's shapes, so clients count and split tokens as the
server does (lm-evaluation-harness's ``local-completions`` model tokenizes through them when
the server answers ``/tokenizer_info``, so it needs no copy of the tokenizer):

- ``POST /tokenize`` ``{"prompt": str}`` or ``{"messages": [...], "add_generation_prompt"?}``
  (rendered by the chat template) -> ``{"count", "max_model_len", "tokens"}``;
- ``POST /detokenize`` ``{"tokens": [int]}`` -> ``{"prompt": str}``;
- ``GET /tokenizer_info`` -> the special tokens, the chat template in use and the sizes.

Special tokens are never added (``add_special_tokens`` is accepted and ignored: pilelm's
tokenizers add none), and a prompt is encoded as text, as completions encode it: a special
token's string in it is ordinary characters (``ServeContext.encode_text``); messages are
rendered and encoded as chat completions do (``chat.chat_prompt_ids``). The API key, when set,
is required as on ``/v1/*``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from pilelm.serve.chat import chat_prompt_ids, check_messages
from pilelm.serve.respond import ServeContext
from pilelm.serve.schemas import APIError, parse_request
from pilelm.tokens.chat import DEFAULT_CHAT_TEMPLATE


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, ctx: ServeContext) -> None:
    tokenizer = ctx.engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_request(TokenizeRequest, await ctx.read_json(request))
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt (a string) or messages (a chat)", param="prompt")
        if req.prompt is not None:
            tokens = ctx.encode_text(req.prompt)
        else:
            tokens = await chat_prompt_ids(ctx, check_messages(req.messages or []), req.add_generation_prompt)
        return {"count": len(tokens), "max_model_len": ctx.max_context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, await ctx.read_json(request))
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        ctx.check_key(request)
        special = {key: ctx.special_tokens.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos_id = ctx.engine.eos_id
        if special["eos_token"] is None and eos_id is not None:
            special["eos_token"] = tokenizer.decode([eos_id], skip_special_tokens=False)
        return {
            **special,
            "chat_template": ctx.chat_template or DEFAULT_CHAT_TEMPLATE,
            "model_max_length": ctx.max_context,
            "vocab_size": ctx.engine.vocab_size,
        }
