"""`pilelm serve` for classifiers, taggers, punctuation models and encoders: TEI's /predict,
/embed, /rerank and /info over real HTTP (uvicorn on 127.0.0.1, httpx)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from pilelm.finetune.predict import Predictor
from pilelm.inference.text_encoder import TextEncoder
from pilelm.serve import BackgroundServer, ServeConfig
from pilelm.serve.heads import HeadsContext
from pilelm.serve.heads_app import create_heads_app, load_heads, serves_heads


@contextlib.contextmanager
def heads_server(run, api_key=None, **config):
    cfg = ServeConfig(run=str(run), api_key=api_key, device="cpu", **config)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with BackgroundServer(create_heads_app(load_heads(cfg), cfg)) as srv, \
            httpx.Client(base_url=srv.url, headers=headers, timeout=60) as http:
        yield http


def test_classifier_predict_follows_tei(head_fine_tunes):
    ft = head_fine_tunes["classify"]
    assert serves_heads(ft)
    p = Predictor(ft, "cpu")
    with heads_server(ft) as http:
        one = http.post("/predict", json={"inputs": "apple banana cherry"}).json()
        assert [d["label"] for d in one] == [r["label"] for r in p.classify(["apple banana cherry"], 2)[0]["top_k"]]
        assert sum(d["score"] for d in one) == pytest.approx(1.0, abs=1e-5)
        assert one[0]["score"] >= one[1]["score"]
        many = http.post("/predict", json={"inputs": ["zebra lion", "apple melon"]}).json()
        assert len(many) == 2 and many[0][0]["label"] == p.classify("zebra lion")[0]["label"]
        raw = http.post("/predict", json={"inputs": "zebra lion", "raw_scores": True}).json()
        logits = p.class_logits(["zebra lion"])[0].tolist()
        assert sorted(d["score"] for d in raw) == pytest.approx(sorted(logits), abs=1e-4)
        info = http.get("/info").json()
        assert info["model_type"]["classifier"]["id2label"] == {"0": "animal", "1": "fruit"}
        assert http.get("/health").json()["status"] == "ok"
        # TEI's validation errors
        bad = http.post("/predict", json={"inputs": 3})
        assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"
        assert http.post("/predict", json={"inputs": ["a"] * 65}).status_code == 413
        assert http.post("/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        assert http.post("/embed", json={"inputs": "x"}).status_code == 404  # a classifier does not embed


def test_tagger_and_punctuation_model(head_fine_tunes):
    text = "Alice lives in Paris ."
    with heads_server(head_fine_tunes["ner"]) as http:
        got = http.post("/predict", json={"inputs": text}).json()
        assert got == Predictor(head_fine_tunes["ner"], "cpu").tag([text])[0]
        assert all(text[e["start"]:e["end"]] == e["word"] for e in got)
    with heads_server(head_fine_tunes["punct"]) as http:
        got = http.post("/predict", json={"inputs": ["the cat saw the park"]}).json()
        assert got[0][0]["generated_text"].lower().replace(",", "").replace(".", "").replace("?", "") \
            == "the cat saw the park"


def test_embed_and_rerank(tiny_run):
    encoder = TextEncoder.from_run(tiny_run, device="cpu")
    cfg = ServeConfig(run=str(tiny_run), api_key="k")
    app = create_heads_app(HeadsContext("tiny", encoder=encoder, api_key="k"), cfg)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        texts = ["the quick brown fox", "pack my box with five dozen liquor jugs"]
        assert http.post("/embed", json={"inputs": texts}).status_code == 401
        auth = {"Authorization": "Bearer k"}
        vecs = np.array(http.post("/embed", json={"inputs": texts}, headers=auth).json())
        np.testing.assert_allclose(vecs, encoder.embed_queries(texts), atol=1e-5)
        ranked = http.post("/rerank", json={"query": "the quick brown fox jumps", "texts": texts[::-1],
                                            "return_text": True}, headers=auth).json()
        scores = encoder.embed_queries(texts[::-1]) @ encoder.embed_queries(["the quick brown fox jumps"])[0]
        assert [r["index"] for r in ranked] == list(np.argsort(-scores))
        assert ranked[0]["text"] == texts[::-1][ranked[0]["index"]]
        assert http.get("/info", headers=auth).json()["model_type"] == {"embedding": {"pooling": "mean"}}


def test_pilelm_serve_dispatches_a_fine_tune(head_fine_tunes):
    """The command itself: `pilelm serve FT_DIR` answers /predict."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pilelm", "serve", str(head_fine_tunes["classify"]),
                             "--port", str(port), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"inputs": "zebra"}, timeout=30)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        assert r.status_code == 200 and {d["label"] for d in r.json()} == {"animal", "fruit"}
    finally:
        proc.terminate()
        proc.wait(30)
