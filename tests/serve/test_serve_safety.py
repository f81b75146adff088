"""pilelm serve under hostile use: disconnects free their work at once, parser failures are
400s, server errors say nothing of their cause, and web pages get only what they are let to."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from test_serve import own_server, wait_until

from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine
from pilelm.serve.engine import Finished, TextDelta
from pilelm.serve.server import require_key_off_loopback, run_serve


def ticking_submit(cancelled: list[int]):
    """An engine's ``submit`` whose rows send a token every 5 ms until cancelled (at most 25 s):
    events never pause, as with a large batch decoding fast. Cancelled rows are counted."""

    def submit(job) -> None:
        def tick() -> None:
            for step in range(1, 5000):
                if job.cancelled:
                    cancelled.append(len(job.rows))
                    return
                for row in job.rows:
                    job.emit(TextDelta(row.index, "a", step))
                time.sleep(0.005)
            for row in job.rows:
                job.emit(Finished(row.index, "length", 5000))

        threading.Thread(target=tick, daemon=True).start()

    return submit


def test_a_non_streaming_client_that_leaves_frees_its_rows_at_once(tiny_run):
    cfg = ServeConfig(run=str(tiny_run))
    engine = load_engine(cfg)  # never started: the ticking submit stands in for decoding
    cancelled: list[int] = []
    engine.submit = ticking_submit(cancelled)
    with BackgroundServer(create_app(engine, cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        body = {"prompt": "the", "n": 16, "max_tokens": 100}
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        wait_until(lambda: client.get("/health").json()["active_requests"] == 0, "the slot to be freed")
        wait_until(lambda: cancelled == [16], "the rows to be cancelled")


def test_parser_failures_are_400_and_server_errors_hide_their_cause(tiny_run):
    def broken(forward):
        def fail(*args, **kwargs):
            raise RuntimeError("secret detail /home/user/model.bin")
        return fail

    with own_server(tiny_run, broken) as (_, client):
        deep = "[" * 100_000 + "]" * 100_000
        for body in (deep, '{"prompt": ' + deep + "}"):
            r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text[:200]
        r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text


def test_api_posts_must_be_json(tiny_run):
    with own_server(tiny_run) as (_, client):
        body = '{"prompt": "the", "max_tokens": 2}'
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"Content-Type": content_type} if content_type else {}
            for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize"):
                r = client.post(path, content=body, headers=headers)
                assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], content_type
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200


def test_host_and_origin_are_checked_against_the_bind_address(tiny_run):
    with own_server(tiny_run) as (_, client):
        port = client.base_url.port
        # DNS rebinding: the page's own name, re-pointed at 127.0.0.1, arrives as the Host.
        for path in ("/", "/health", "/v1/models"):
            r = client.get(path, headers={"Host": f"evil.example:{port}"})
            assert r.status_code == 403 and "--allow-origin" in r.json()["error"]["message"], path
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                        headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                        headers={"Origin": f"http://localhost:{port + 1}"})  # another local app
        assert r.status_code == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):  # the playground's own page
            r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                            headers={"Host": host, "Origin": f"http://{host}"})
            assert r.status_code == 200, host
        assert "access-control-allow-origin" not in r.headers

    with own_server(tiny_run, allow_origin=["http://app.example:3000"]) as (_, client):
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1},
                        headers={"Origin": "http://app.example:3000", "Host": "app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example:3000"
        assert client.get("/health", headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_non_loopback_bind_needs_a_key_or_insecure_no_key(tiny_run, monkeypatch):
    monkeypatch.delenv("PILELM_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(ValueError, match="--insecure-no-key"):
            run_serve(ServeConfig(run=str(tiny_run), host=host))
    for cfg in (ServeConfig(run=str(tiny_run), host="0.0.0.0", api_key="k"),
                ServeConfig(run=str(tiny_run), host="0.0.0.0", insecure_no_key=True),
                ServeConfig(run=str(tiny_run), host="127.0.0.1"), ServeConfig(run=str(tiny_run), host="::1")):
        require_key_off_loopback(cfg)


def test_the_reliability_flags_parse_on_the_command_line():
    from pilelm.core.cli import parse_args
    from pilelm.core.config import load_config
    from pilelm.core.stages import COMMANDS
    from pilelm.training.config import TrainConfig

    serve = COMMANDS["serve"]
    path, overrides = parse_args(serve, ServeConfig, ["RUN", "--host", "0.0.0.0", "--insecure-no-key",
                                                     "--allow-origin", "http://a.example", "--allow-origin", "*"])
    cfg = load_config(ServeConfig, path, overrides)
    assert cfg.insecure_no_key and cfg.allow_origin == ["http://a.example", "*"] and cfg.run == "RUN"
    path, overrides = parse_args(COMMANDS["train"], TrainConfig, ["--data", "S", "-o", "R", "--restart"])
    assert load_config(TrainConfig, path, overrides).restart
