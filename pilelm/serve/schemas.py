"""Request validation and OpenAI-style errors for the completions API (chat's request is
``chat.py``'s, built from the same pieces).

The request fields and their ranges follow the OpenAI legacy completions API
(https://platform.openai.com/docs/api-reference/completions/create); ``top_k`` and
``repetition_penalty`` are extensions (as in vLLM). Types are strict: ``"5"`` is not an
integer and ``true`` is not a number. Fields that clients often send with their neutral value
(``presence_penalty: 0``, ``best_of: 1`` ...) are accepted at that value
and refused otherwise with a message saying so; any other unknown field is an error, as it is
with OpenAI ("Unrecognized request argument supplied").
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from pilelm.inference.sampling import SamplingParams, float32_problem

# torch.Generator.manual_seed takes a 64-bit seed; the choices of a request use seed + i.
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
RequestT = TypeVar("RequestT", bound=BaseModel)
_DEFAULT = SamplingParams()  # what a request that omits a sampling field gets
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's completions allow 5)


def _float32(value: float) -> float:
    problem = float32_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Float32 = Annotated[float, AfterValidator(_float32)]
"""A float the float32 sampler can carry: 0, or a normal float32 (a nonzero value that would
become 0, a subnormal or inf in float32 is a 400 naming the field)."""


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    """Send a last chunk with the request's token usage."""
    continuous_usage_stats: bool = False
    """Put the usage so far in every chunk (a vLLM extension; the playground's tokens/s)."""


class GenerationFields(BaseModel):
    """The fields completions and chat completions share: model, sampling, stop, stream."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str | None = None
    # Defaults: SamplingParams' (the OpenAI API's); the ranges are the API's (le=2 for temperature).
    temperature: Float32 = Field(default=_DEFAULT.temperature, ge=0.0, le=2.0)
    top_p: Float32 = Field(default=_DEFAULT.top_p, gt=0.0, le=1.0)
    top_k: int = Field(default=_DEFAULT.top_k, ge=0)
    repetition_penalty: Float32 = Field(default=_DEFAULT.repetition_penalty, gt=0.0, le=10.0)
    n: int = Field(default=1, ge=1, le=128)  # OpenAI's limit
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values (clients such as LangChain always send them).
    presence_penalty: Float32 = 0.0
    frequency_penalty: Float32 = 0.0
    logit_bias: dict[str, Float32] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_new_tokens: int, stop: list[str], logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's sampling as the engine takes it (the one ``SamplingParams``)."""
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, stop=stop, seed=self.seed,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def check_common(self) -> None:
        refuse_unsupported({
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        })
        check_stop_strings(self.stop_strings())


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None  # accepted only at n
    suffix: str | None = None  # accepted only when null

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]

    def check_supported(self) -> None:
        """Refuse features this server does not implement, naming the field."""
        refuse_unsupported({"best_of": self.best_of not in (None, self.n), "suffix": self.suffix is not None})
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        self.check_common()


def refuse_unsupported(fields: dict[str, bool]) -> None:
    """A 400 naming the first field set (True) to a value this server does not implement."""
    for name, bad in fields.items():
        if bad:
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise APIError(400, f"{name} is not supported by this server{hint}", param=name)


def check_stop_strings(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop strings must be 1 to {MAX_STOP_CHARS} characters long", param="stop")


# How a wrongly typed union field is described (pydantic lists one error per union member).
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string, a list of strings or null",
}


def parse_json_body(raw: bytes) -> Any:
    """JSON per RFC 8259: NaN and Infinity (which Python's json accepts) are refused, and so
    are strings holding a lone UTF-16 surrogate (``"\\ud800"``: valid JSON escapes, but not
    text; no tokenizer can encode them)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    try:
        where = _lone_surrogate(body, "")
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if where is not None:
        field = where.lstrip(".").split(".")[0].split("[")[0] or None
        raise APIError(400, f"{where.lstrip('.') or 'the body'} holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                            "\\udfff escape), which is not text; send valid Unicode", param=field)
    return body


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The path of the first string (or key) in ``value`` holding a lone surrogate, or None
    (json pairs escaped surrogates into one character, so any left are unpaired)."""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    if isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _lone_surrogate(v, f"{where}[{i}]")) is not None:
                return found
    elif isinstance(value, dict):
        for k, v in value.items():
            if _SURROGATE.search(k):
                return f"{where}.{ascii(k)}"
            if (found := _lone_surrogate(v, f"{where}.{k}")) is not None:
                return found
    return None


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """``body`` (parsed JSON) validated as ``model``, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, body) from None


def parse_completion_request(body: Any) -> CompletionRequest:
    req = parse_request(CompletionRequest, body)
    req.check_supported()
    return req


def validation_error(e: ValidationError, body: dict[str, Any]) -> APIError:
    """The first of pydantic's complaints about ``body`` as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {field}", param=field)
    if err["type"] == "missing":
        return APIError(400, f"{field} is required", param=field)
    if field in _SHAPES and len(loc) > 1 and not loc[1].isdigit():
        return APIError(400, f"{field} must be {_SHAPES[field]}; got {_short(body.get(field))}", param=field)
    where = ".".join(loc)
    value = err.get("input")
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
    return APIError(400, f"{where}: {msg} (got {_short(value)})", param=field)


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
