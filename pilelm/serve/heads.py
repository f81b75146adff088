"""Routes for models that do not generate: classifiers, taggers, punctuation models, embedders.

They follow Hugging Face Text Embeddings Inference (TEI, https://huggingface.github.io/
text-embeddings-inference/, its OpenAPI ``/predict``, ``/embed``, ``/rerank``, ``/info``):

- ``POST /predict`` ``{"inputs": "text" | ["text", ...], "raw_scores": false}``: a classifier
  answers, per text, every label ``[{"label", "score"}, ...]`` best first (softmax scores, or
  logits with ``raw_scores``); one text gives one list, a list of texts a list of lists, as
  TEI answers. TEI has no token tasks, so a tagger answers as the HF Inference API's
  token-classification task does (``[{"entity_group", "score", "word", "start", "end"}]`` per
  text, ``aggregation_strategy="simple"``), and a punctuation model as its text2text task
  (``[{"generated_text"}]`` per text).
- ``POST /embed`` ``{"inputs": ..., "normalize": true}``: one vector per text, always a list.
- ``POST /rerank`` ``{"query", "texts", "return_text": false}``: the texts by cosine similarity
  of their embeddings to the query's, best first, ``[{"index", "score", "text"?}]`` (TEI ranks
  with a cross-encoder; an embedder ranks as a bi-encoder).
- ``GET /info``: ``model_id``, ``model_type`` (``{"classifier": {"id2label"}}`` or
  ``{"embedding": {"pooling"}}``), ``max_input_length``, ``max_client_batch_size``.

Errors are TEI's ``{"error": "...", "error_type": "Validation"}`` with 413 (too many inputs or
bytes), 422 (a malformed request) or 401 (a missing or wrong key). The model runs under a lock
in FastAPI's worker threads: one forward at a time, batched per request.
"""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class TEIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "Validation"):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": self.message, "error_type": self.error_type}, self.status, headers=headers)


@dataclass
class HeadsContext:
    """What the head routes share: the models, the key, the limits, the model lock."""

    name: str
    predictor: Any = None
    """A ``pilelm.finetune.predict.Predictor`` (classify, ner, punct), or None."""
    encoder: Any = None
    """A ``pilelm.inference.text_encoder.TextEncoder``, or None."""
    api_key: str | None = None
    max_batch: int = 64
    """Most inputs per request (TEI's max_client_batch_size)."""
    max_request_bytes: int = 1_000_000
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise TEIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", "Unauthorized")

    async def body(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise TEIError(413, f"the request body is {declared} bytes; the limit is {self.max_request_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_request_bytes:
                raise TEIError(413, f"the request body exceeds {self.max_request_bytes} bytes")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TEIError(422, f"the body is not valid JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise TEIError(422, "the body must be a JSON object")
        return data

    def texts(self, value: Any, key: str = "inputs") -> tuple[list[str], bool]:
        """(texts, whether one text was sent) of an ``inputs`` value."""
        if isinstance(value, str):
            items, one = [value], True
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            items, one = list(value), False
        else:
            raise TEIError(422, f"{key} must be a string or a non-empty list of strings")
        if len(items) > self.max_batch:
            raise TEIError(413, f"batch size {len(items)} > max_client_batch_size {self.max_batch}")
        if any(not t.strip() for t in items):
            raise TEIError(422, f"{key} holds an empty text")
        return items, one


def _run(ctx: HeadsContext, fn: Any, *args: Any) -> Any:
    with ctx.lock:
        try:
            return fn(*args)
        except ValueError as e:  # a text the model cannot take (too long for an embedder)
            raise TEIError(413 if "tokens" in str(e) else 422, str(e)) from None


def add_error_handler(app: FastAPI) -> None:
    @app.exception_handler(TEIError)
    async def _tei_error(request: Request, exc: TEIError) -> JSONResponse:
        return exc.response()


def add_predict_routes(app: FastAPI, ctx: HeadsContext) -> None:
    """``POST /predict`` for a classify, ner or punct fine-tune."""
    predictor = ctx.predictor

    def answer(texts: list[str], raw_scores: bool) -> list[Any]:
        if predictor.task == "classify":
            logits = predictor.class_logits(texts)
            scores = (logits if raw_scores else logits.softmax(-1)).tolist()
            labels = predictor.labels
            return [sorted(({"label": labels[i], "score": s} for i, s in enumerate(row)), key=lambda d: -d["score"])
                    for row in scores]
        if predictor.task == "ner":
            return predictor.tag(texts)
        return [[{"generated_text": t}] for t in predictor.punctuate(texts)]

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        data = await ctx.body(request)
        texts, one = ctx.texts(data.get("inputs"))
        raw = data.get("raw_scores", False)
        if not isinstance(raw, bool):
            raise TEIError(422, "raw_scores must be true or false")
        import anyio.to_thread

        out = await anyio.to_thread.run_sync(_run, ctx, answer, texts, raw)
        return JSONResponse(out[0] if one else out)


def add_embed_routes(app: FastAPI, ctx: HeadsContext) -> None:
    """``POST /embed`` and ``POST /rerank`` for a model that embeds."""
    encoder = ctx.encoder

    def vectors(texts: list[str]) -> Any:
        return encoder.embed_queries(texts)  # unit vectors

    @app.post("/embed")
    async def embed(request: Request) -> JSONResponse:
        import anyio.to_thread

        data = await ctx.body(request)
        texts, _ = ctx.texts(data.get("inputs"))
        if data.get("normalize", True) is not True:
            raise TEIError(422, "normalize=false is not offered: the vectors are pooled then L2-normalised")
        out = await anyio.to_thread.run_sync(_run, ctx, vectors, texts)
        return JSONResponse(out.tolist())

    @app.post("/rerank")
    async def rerank(request: Request) -> JSONResponse:
        import anyio.to_thread

        data = await ctx.body(request)
        query = data.get("query")
        if not isinstance(query, str) or not query.strip():
            raise TEIError(422, "query must be a non-empty string")
        texts, _ = ctx.texts(data.get("texts"), "texts")
        vecs = await anyio.to_thread.run_sync(_run, ctx, vectors, [query, *texts])
        scores = (vecs[1:] @ vecs[0]).tolist()
        ranked = sorted(range(len(texts)), key=lambda i: -scores[i])
        with_text = data.get("return_text") is True
        return JSONResponse([{"index": i, "score": scores[i], **({"text": texts[i]} if with_text else {})}
                             for i in ranked])


def info(ctx: HeadsContext) -> dict[str, Any]:
    if ctx.predictor is not None:
        p = ctx.predictor
        kind = {"classifier": {"id2label": {str(i): label for i, label in enumerate(p.labels)}, "task": p.task}}
        max_input = p.head.max_length
    else:
        kind = {"embedding": {"pooling": ctx.encoder.pooling}}
        max_input = ctx.encoder.max_tokens
    return {"model_id": ctx.name, "model_type": kind, "max_input_length": max_input,
            "max_client_batch_size": ctx.max_batch, "version": "pilelm"}


def add_info_routes(app: FastAPI, ctx: HeadsContext) -> None:
    """``GET /info`` and ``GET /health`` (TEI's: 200 when the model is loaded)."""

    @app.get("/info")
    async def get_info(request: Request) -> dict[str, Any]:
        ctx.check_key(request)
        return info(ctx)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": ctx.name}
