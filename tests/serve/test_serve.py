"""pilelm serve: the OpenAI-compatible API, batching, streaming text, limits and errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from pilelm.core.cli import main as cli_main
from pilelm.core.manifest import write_manifest
from pilelm.inference.decode_batch import stream_batch
from pilelm.inference.generate import generate
from pilelm.inference.sampling import SamplingParams
from pilelm.inference.textstream import CompletionText, stop_prefix_length
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine
from pilelm.serve.engine import Engine, Finished, RowSpec, Submission, TextDelta
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.training import checkpoint
from pilelm.training.checkpoint import load_for_inference

KEY = "sk-test-0123"
MODEL = "tiny"


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent-event stream, JSON-decoded except [DONE]."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a bound on a wait, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tokenizer(tiny_run: Path):
    return load_tokenizer(tiny_run / "tokenizer")


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    cfg = ServeConfig(run=str(tiny_run), api_key=KEY, model_name=MODEL, max_batch=16, max_concurrent=32,
                      max_request_bytes=20_000)
    engine = load_engine(cfg)
    engine.start()
    with BackgroundServer(create_app(engine, cfg)) as srv:
        client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=srv.url, engine=engine, client=client)
        client.close()
    engine.stop()


def complete(server, **body) -> dict:
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- streaming text ------------------------------------------------------------------------


def test_streamed_text_never_splits_a_character(tokenizer):
    text = "emoji 🎉 rocket 🚀 a café in Zürich 世界"
    ids = tokenizer.encode(text)
    # Guard: the test means something only if some character spans several tokens.
    assert any(len(tokenizer.encode(ch)) > 1 for ch in "🎉🚀世界")
    stream = CompletionText(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert sum(1 for d in deltas if d) > 5  # streamed in pieces, not all at the end

    # Cut by the token limit inside the last character: it is dropped, not sent as U+FFFD.
    cut = tokenizer.encode("ab 🎉")[:-1]
    stream = CompletionText(tokenizer)
    assert "".join([stream.push(i) for i in cut] + [stream.finish()]) == "ab "


def test_streamed_text_holds_back_possible_stop_strings(tokenizer):
    assert stop_prefix_length("the fo", ["fox"]) == 2
    assert stop_prefix_length("the fox", ["fox"]) == 0  # a whole match is cut, not held
    assert stop_prefix_length("a\n", ["\n\n", "zz"]) == 1

    def run(text: str, stop: list[str]) -> tuple[list[str], bool]:
        stream = CompletionText(tokenizer, stop)
        deltas = [stream.push(i) for i in tokenizer.encode(text)]
        return deltas + [stream.finish()], stream.stopped

    deltas, stopped = run("the quick brown fox jumps", ["fox", "dog"])
    assert stopped and "".join(deltas) == "the quick brown "
    emitted = ""
    for d in deltas:  # no prefix of what was sent ever ends inside the stop string
        emitted += d
        assert "f" not in emitted[len("the quick brown "):]
    # A false alarm ("fo" then "r") is released once decided.
    deltas, stopped = run("go for it", ["fox"])
    assert not stopped and "".join(deltas) == "go for it"


# --- the API -------------------------------------------------------------------------------


def test_greedy_completion_matches_the_generate_library(server, tiny_run, tokenizer):
    model, _, _ = load_for_inference(tiny_run)
    expected = generate(model, tokenizer, ["the quick"], SamplingParams(max_new_tokens=20, temperature=0))[0]
    out = complete(server, model=MODEL, prompt="the quick", max_tokens=20, temperature=0)
    (choice,) = out["choices"]
    assert choice["text"].rstrip() == expected and expected.startswith(" brown fox")
    assert choice["finish_reason"] in ("stop", "length")
    assert out["object"] == "text_completion" and out["model"] == MODEL
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode("the quick"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 20


def test_stream_matches_non_stream_and_ends_with_done(server):
    body = {"prompt": "a café", "max_tokens": 30, "temperature": 0}
    whole = complete(server, **body)["choices"][0]
    with server.client.stream("POST", "/v1/completions",
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 3
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0


def test_stop_strings_cut_the_text_streaming_or_not(server):
    body = {"prompt": "the quick", "max_tokens": 30, "temperature": 0, "stop": [" jumps", "zzz"]}
    choice = complete(server, **body)["choices"][0]
    assert choice == {"index": 0, "text": " brown fox", "logprobs": None, "finish_reason": "stop"}
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        texts = [e["choices"][0]["text"] for e in sse_events(r) if isinstance(e, dict)]
    assert "".join(texts) == " brown fox" and not any("j" in t for t in texts)


def test_n_choices_several_prompts_seed_and_echo(server):
    body = {"prompt": ["the quick", "pack my"], "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 7,
            "echo": True}
    first = complete(server, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert all(c["text"].startswith("the quick") for c in first["choices"][:2])
    assert all(c["text"].startswith("pack my") for c in first["choices"][2:])
    assert complete(server, **body)["choices"] == first["choices"]  # seeded: reproducible


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    bad = [
        (b"{", 400),
        (b"[1, 2]", 400),
        (b'{"prompt": "x", "max_tokens": NaN}', 400),
        (b"\xff\xfe", 400),
        (json.dumps({"max_tokens": 5}), 400),  # no prompt
        (json.dumps({"prompt": 5}), 400),
        (json.dumps({"prompt": ["a", 1]}), 400),
        (json.dumps({"prompt": []}), 400),
        (json.dumps({"prompt": "x", "max_tokens": "5"}), 400),
        (json.dumps({"prompt": "x", "max_tokens": True}), 400),
        (json.dumps({"prompt": "x", "max_tokens": -1}), 400),
        (json.dumps({"prompt": "x", "max_tokens": 10**30}), 400),
        (json.dumps({"prompt": "x", "temperature": -0.5}), 400),
        (json.dumps({"prompt": "x", "temperature": 1e308 * 10}), 400),  # Infinity
        (json.dumps({"prompt": "x", "top_p": 0}), 400),
        (json.dumps({"prompt": "x", "n": 0}), 400),
        (json.dumps({"prompt": "x", "n": 10**6}), 400),
        (json.dumps({"prompt": "x", "n": 17}), 400),  # more completions than max_batch (16)
        (json.dumps({"prompt": ["x"] * 1000}), 400),
        (json.dumps({"prompt": "x", "seed": -1}), 400),
        (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400),
        (json.dumps({"prompt": "x", "stop": [""]}), 400),
        (json.dumps({"prompt": "x", "logprobs": 21}), 400),
        (json.dumps({"prompt": "x", "logprobs": -1}), 400),
        (json.dumps({"prompt": "x", "frobnicate": 1}), 400),
        (json.dumps({"prompt": [10**6]}), 400),  # token id outside the vocabulary
        (json.dumps({"prompt": "the " * 200}), 400),  # longer than the context
        (json.dumps({"prompt": "the quick", "max_tokens": 127}), 400),  # prompt + completion > context
        (json.dumps({"prompt": "x", "model": "gpt-4"}), 404),
        (json.dumps({"prompt": "x" * 30_000}), 413),
    ]
    for body, status in bad:
        r = server.client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error", err
    assert server.client.get("/v1/nothing-here").json()["error"]["message"]
    ok = complete(server, prompt="the quick", max_tokens=5, temperature=0)
    assert ok["choices"][0]["text"].startswith(" brown")
    assert server.client.get("/health").json()["engine"]["errors"] == 0


def test_api_key_is_required_on_the_api_but_not_on_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["auth"] is True and health["model"] == MODEL
    assert health["batching"] == "continuous" and health["engine"]["admissions"] >= health["engine"]["batches"]
    models = server.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_official_openai_client_completes_and_streams(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=0)
    assert out.choices[0].text.startswith(" brown fox")
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="the quick", max_tokens=12, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == out.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).completions.create(
            model=MODEL, prompt="x")


# --- scheduling, limits, disconnects, failures (each with its own engine) -------------------


def _asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=60)


def test_concurrent_requests_share_one_batch_with_the_same_results(tiny_run):
    prompts = ["the quick", "pack my box", "a", "emoji", "世界", "a café in Zürich"]
    cfg = ServeConfig(run=str(tiny_run), max_batch=8)
    engine = load_engine(cfg)
    app = create_app(engine, cfg)

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with _asgi_client(app) as client:
            bodies = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p in prompts]
            bodies.append({"prompt": "the", "max_tokens": 12, "temperature": 1.0, "seed": 3})
            # The engine is not running yet: every request queues, then they start as one batch.
            tasks = [asyncio.create_task(client.post("/v1/completions", json=b)) for b in bodies]
            while engine.snapshot()["queued"] < len(bodies):
                await asyncio.sleep(0.01)
            engine.start()
            batched = [(await t).json() for t in tasks]
            assert engine.snapshot()["batches"] == 1 and engine.snapshot()["largest_batch"] == len(bodies)
            single = [(await client.post("/v1/completions", json=b)).json() for b in bodies]
            return batched, single

    try:
        batched, single = asyncio.run(scenario())
    finally:
        engine.stop()
    # Left padding and batch neighbours change nothing: each row decodes as it would alone.
    assert [b["choices"] for b in batched] == [s["choices"] for s in single]
    assert engine.snapshot()["batches"] == 1 + len(prompts) + 1


class LetterTokenizer:
    """One letter per token and no end-of-text token, so a random model's rows run to their budget."""

    eod_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 26 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_arriving_mid_decode_joins_the_running_batch(continuous):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, d_model=64)).eval()
    engine = Engine(model, LetterTokenizer(), max_batch=4, batch_window_s=0.0, continuous=continuous)
    events: list[tuple[str, object, int]] = []  # (request, event, decode steps run when it came)
    both_done = threading.Event()
    short_params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    short = Submission([RowSpec(0, [5, 6, 7], short_params)], lambda ev: record("short", ev))

    def record(name: str, ev) -> None:
        events.append((name, ev, engine.stats.decode_steps))
        if name == "long" and isinstance(ev, TextDelta) and ev.tokens == 3:
            engine.submit(short)  # arrives while the long request decodes (from the worker thread)
        if sum(isinstance(e, Finished) for _, e, _ in events) == 2:
            both_done.set()

    engine.submit(Submission([RowSpec(0, [1, 2], SamplingParams(max_new_tokens=30, temperature=0.0))],
                      lambda ev: record("long", ev)))
    engine.start()
    try:
        assert both_done.wait(60), "the requests did not finish"
    finally:
        engine.stop()
    steps = {(name, type(ev).__name__, getattr(ev, "tokens", None)): n for name, ev, n in events}
    joined_at = steps[("long", "TextDelta", 3)]
    short_first = steps[("short", "TextDelta", 1)]
    long_end = steps[("long", "Finished", 30)]
    stats = engine.snapshot()
    if continuous:
        # The short request joined at the next step and finished while the long one decoded.
        assert short_first == joined_at + 1 and steps[("short", "Finished", 5)] < long_end
        assert (stats["batches"], stats["admissions"], stats["largest_batch"]) == (1, 2, 2)
        assert stats["decode_steps"] == 30
    else:  # static batching: it waited for the long one to end
        assert short_first == long_end + 1
        assert (stats["batches"], stats["admissions"], stats["largest_batch"]) == (2, 2, 1)
    # Joining a running batch changes nothing: the short row samples what it would alone.
    alone = [s[0] for s in stream_batch(model, [[5, 6, 7]], [short_params], None)]
    text = "".join(ev.text for name, ev, _ in events if name == "short" and isinstance(ev, TextDelta))
    assert text == LetterTokenizer().decode(alone)
    assert stats["rows_finished"] == 2 and stats["tokens_generated"] == 35 and stats["running"] == 0


def test_too_many_concurrent_requests_get_429_until_a_slot_frees(tiny_run):
    cfg = ServeConfig(run=str(tiny_run), max_concurrent=2)
    engine = load_engine(cfg)
    app = create_app(engine, cfg)
    body = {"prompt": "the quick", "max_tokens": 4, "temperature": 0}

    async def scenario() -> None:
        async with _asgi_client(app) as client:
            held = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
            while app.state.slots.active < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/completions", json={**body, "stream": True})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
            engine.start()
            assert [(await t).status_code for t in held] == [200, 200]
            assert app.state.slots.active == 0
            assert (await client.post("/v1/completions", json=body)).status_code == 200

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


@contextlib.contextmanager
def own_server(tiny_run: Path, wrap_forward=None, **config):
    """A server with an engine of its own; ``wrap_forward`` wraps the model's forward (to slow
    decoding down or make it fail). Yields (engine, client)."""
    cfg = ServeConfig(run=str(tiny_run), **config)
    engine = load_engine(cfg)
    if wrap_forward is not None:
        engine.model.forward = wrap_forward(engine.model.forward)
    engine.start()
    try:
        with BackgroundServer(create_app(engine, cfg)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
            yield engine, client
    finally:
        engine.stop()


def slowed(forward):
    """20 ms per forward: the stream is still running when the test acts."""
    return lambda *args, **kwargs: (time.sleep(0.02), forward(*args, **kwargs))[1]


def test_client_that_disconnects_mid_stream_frees_its_slot_and_row(tiny_run):
    with own_server(tiny_run, slowed, max_concurrent=1) as (engine, client):
        body = {"prompt": "the", "max_tokens": 120, "temperature": 1.0, "seed": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # one chunk, then leave
        wait_until(lambda: client.get("/health").json()["active_requests"] == 0, "the slot to be freed")
        wait_until(lambda: engine.snapshot()["rows_cancelled"] == 1, "the engine to drop the row")
        stats = engine.snapshot()
        assert stats["tokens_generated"] < 120 and stats["rows_finished"] == 0
        assert client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 3}).status_code == 200


def test_a_failing_batch_answers_500_and_the_server_recovers(tiny_run):
    fail = {"next": False}

    def flaky(forward):
        def flaky_forward(*args, **kwargs):
            if fail["next"]:
                fail["next"] = False
                raise RuntimeError("simulated device error")
            return forward(*args, **kwargs)
        return flaky_forward

    with own_server(tiny_run, flaky) as (engine, client):
        fail["next"] = True
        r = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 5})
        assert r.status_code == 500 and "simulated device error" not in r.text  # the log has it
        assert r.json()["error"]["type"] == "server_error" and "server log" in r.json()["error"]["message"]
        fail["next"] = True
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 5, "stream": True}) as s:
            events = sse_events(s)
        assert "server log" in events[-1]["error"]["message"] and "[DONE]" not in events
        r = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" brown")
        assert engine.snapshot()["errors"] == 2


def test_stopping_the_engine_ends_running_and_waiting_requests_with_an_error(tiny_run):
    with own_server(tiny_run, slowed, max_batch=1) as (engine, client):
        body = {"prompt": "the", "max_tokens": 120, "temperature": 1.0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            waiting = client.build_request("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 3})
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(client.send, waiting)
                wait_until(lambda: engine.snapshot()["queued"] == 1, "the second request to queue")
                engine.stop()
                assert queued.result().status_code == 500
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "shutting down" in rest[-1]["error"]["message"]
        assert queued.result().json()["error"]["message"] == "the server is shutting down"
        assert engine.snapshot()["errors"] == 0  # a shutdown is not a generation error


# --- config, CLI, playground ----------------------------------------------------------------


def test_config_validation_and_cli_help(capsys, tmp_path):
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    assert cli_main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("host=", "port=", "api_key=", "max_prompt_tokens=", "max_tokens=", "max_concurrent=",
                "batch_window_ms=", "max_batch=", "continuous=", "device=", "dtype="):
        assert key in out
    assert cli_main(["serve", str(tmp_path / "no-such-run")]) == 1
    assert "pilelm train" in capsys.readouterr().err


def test_an_encoder_run_is_refused(tiny_run, tmp_path):
    from pilelm.models.bert import Bert, BertConfig

    run = tmp_path / "bert_run"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    bert_cfg = BertConfig(vocab_size=320, n_layer=1, n_head=2, d_model=32, block_size=16)
    ckpt = run / "checkpoints" / "step_00000001"
    checkpoint.save_model(ckpt, Bert(bert_cfg), bert_cfg)
    checkpoint.mark_complete(ckpt)
    write_manifest(run, "train", {})
    with pytest.raises(ValueError, match="causal"):
        load_engine(ServeConfig(run=str(run)))


def test_pilelm_serve_command_serves_until_interrupted(tiny_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PILELM_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilelm", "serve", str(tiny_run), "--port", str(port), "--max-tokens", "32",
         "--log-level", "warning"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "pilelm serve to start", timeout=60)
        health = httpx.get(f"{url}/health").json()
        assert health["model"] == tiny_run.name and health["auth"] and health["limits"]["max_tokens"] == 32
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the quick", "max_tokens": 4, "temperature": 0},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" brown")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_playground_is_served_without_external_resources(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and 'id="generate"' in page.text
    static = Path(__file__).resolve().parents[2] / "pilelm" / "serve" / "static"
    for f in static.iterdir():
        assert httpx.get(f"{server.url}/static/{f.name}").status_code == 200
        assert "://" not in f.read_text(), f"{f.name} must not load anything from the network"


def test_bfloat16_serving_gives_text(tiny_run):
    cfg = ServeConfig(run=str(tiny_run), dtype="bfloat16")
    engine = load_engine(cfg)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    engine.start()
    try:
        async def one() -> dict:
            async with _asgi_client(create_app(engine, cfg)) as client:
                return (await client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 6,
                                                                   "temperature": 0})).json()
        assert asyncio.run(one())["choices"][0]["text"].startswith(" brown")
    finally:
        engine.stop()
