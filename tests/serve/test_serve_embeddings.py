"""POST /v1/embeddings: the official client, batching, encodings, usage, limits and errors."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

from pilelm.inference.text_encoder import TextEncoder
from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine

KEY = "sk-embed"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_run):
    cfg = ServeConfig(run=str(tiny_run), api_key=KEY, model_name=MODEL, max_batch=16, max_request_bytes=20_000)
    engine = load_engine(cfg)
    engine.start()
    app = create_app(engine, cfg)
    with BackgroundServer(app) as srv:
        yield srv, app
    engine.stop()


def test_official_client_gets_the_vectors_pilelm_embed_makes(server, tiny_run):
    srv, _ = server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
    texts = ["the quick brown fox", "pack my box with five dozen liquor jugs."]
    out = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in out.data])
    want = TextEncoder.from_run(tiny_run).embed_queries(texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [d.index for d in out.data] == [0, 1] and out.model == MODEL
    n_tokens = sum(len(x) for x in TextEncoder.from_run(tiny_run).tokenize(texts))
    assert out.usage.prompt_tokens == out.usage.total_tokens == n_tokens
    as_float = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(as_float.data[0].embedding, want[0], atol=1e-5)
    by_ids = client.embeddings.create(model=MODEL, input=TextEncoder.from_run(tiny_run).tokenize(texts[:1])[0])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[0], atol=1e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).embeddings.create(model=MODEL, input="x")


def test_base64_is_little_endian_float32(server):
    srv, _ = server
    r = httpx.post(f"{srv.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                   json={"input": "fox", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (64,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5


@pytest.mark.parametrize("body,status,param", [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": "fox " * 400}, 400, "input"),
    ({"input": [[1, 2], [99999]]}, 400, "input"),
    ({"input": 3.5}, 400, "input"),
    ({"input": "x", "dimensions": 8}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "model": "other"}, 404, "model"),
    ({"input": "x", "temperature": 1}, 400, "temperature"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    srv, _ = server
    r = httpx.post(f"{srv.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_concurrent_requests_share_a_forward_pass(server):
    srv, app = server
    batcher = app.state.embeddings
    before = batcher.batches

    async def scenario() -> list[dict]:
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/v1/embeddings", json={"input": f"text number {i}"}) for i in range(8)])
        return [r.json() for r in rs]

    batcher.batch_window_s = 0.5  # wide enough that the eight requests arrive within one window
    try:
        results = asyncio.run(scenario())
    finally:
        batcher.batch_window_s = 0.02
    assert all(len(r["data"]) == 1 for r in results)
    assert batcher.batches - before < 8
