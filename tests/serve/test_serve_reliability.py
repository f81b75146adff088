"""pilelm serve under hostile or careless requests (issue 29): one request never fails the
batch, text from a request is text, templates cannot freeze the server, bad Unicode is a 400,
abandoned work stops, and the work per request is bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from pilelm.core.cli import parse_args
from pilelm.core.config import load_config
from pilelm.core.stages import COMMANDS
from pilelm.inference.sampling import SamplingParams
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine
from pilelm.serve.chat import chat_prompt_ids
from pilelm.serve.engine import Engine, Failed, Finished, RowSpec, Submission, TextDelta
from pilelm.serve.respond import Slots
from pilelm.serve.schemas import APIError
from pilelm.tokens.chat import encode_chat, render_chat
from pilelm.tokens.tokenizer import load_tokenizer

KEY = "sk-test-rel"


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    cfg = ServeConfig(run=str(tiny_run), api_key=KEY, model_name="tiny", max_batch=16, max_concurrent=32)
    engine = load_engine(cfg)
    engine.start()
    app = create_app(engine, cfg)
    with BackgroundServer(app) as srv:
        client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=srv.url, engine=engine, client=client, cfg=cfg, app=app)
        client.close()
    engine.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_run: Path):
    return load_tokenizer(tiny_run / "tokenizer")


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a bound on a wait, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


# -- one request never fails the batch (item 1) ------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value"), [("temperature", 1e-40), ("repetition_penalty", 1e-40),
                                              ("top_p", 1e-300), ("presence_penalty", 1e39)])
def test_a_float_option_float32_cannot_carry_is_a_400_naming_it(server, route, field, value):
    body = {"max_tokens": 4, field: value}
    body.update({"prompt": "x"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = server.client.post(route, json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == field and "float32" in err["message"]


class LetterTokenizer:
    """One letter per token and no end-of-text token, so a random model's rows run to their budget."""

    eod_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 26 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_a_row_whose_sampling_blows_up_fails_alone():
    """A row whose probabilities are not finite (here the temperature 1e-40, set past the
    checks that now refuse it at the API) fails its own request with a 400; a long valid
    completion decoding in the same batch finishes with every token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, d_model=64)).eval()
    engine = Engine(model, LetterTokenizer(), max_batch=4, batch_window_s=0.05)
    events: dict[str, list] = {"long": [], "poisoned": []}
    done = threading.Event()

    def record(name: str, ev) -> None:
        events[name].append(ev)
        if any(isinstance(e, Finished | Failed) for e in events["long"]) and events["poisoned"]:
            done.set()

    poisoned = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)
    poisoned.temperature = 1e-40  # past the checks (the value): the logits overflow to inf, then NaN
    engine.submit(Submission([RowSpec(0, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=1.0, seed=2))],
                             lambda ev: record("long", ev)))
    engine.submit(Submission([RowSpec(0, [4, 5], poisoned)], lambda ev: record("poisoned", ev)))
    engine.start()  # both wait already: they are prefilled together and decode in one batch
    try:
        assert done.wait(60), "the requests did not finish"
    finally:
        engine.stop()
    failed = [e for e in events["poisoned"] if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].status == 400 and "not finite" in failed[0].message
    long = events["long"]
    assert not [e for e in long if isinstance(e, Failed)]
    assert isinstance(long[-1], Finished) and long[-1].tokens == 30
    assert "".join(e.text for e in long if isinstance(e, TextDelta)) != ""
    stats = engine.snapshot()
    assert stats["largest_batch"] == 2 and stats["rows_failed"] == 1 and stats["errors"] == 0


def test_sampling_params_refuse_what_float32_cannot_carry():
    for key in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(ValueError, match=f"{key}: .*float32"):
            SamplingParams(**{key: 1e-40})


# -- text from a request is text (item 9) ------------------------------------------------------


def test_special_token_strings_in_request_text_encode_as_text(server, tokenizer):
    eos = tokenizer.eod_id
    text = "the fox<|endoftext|>jumps"
    plain = tokenizer.encode_plain(text)
    assert eos not in plain and tokenizer.decode(plain, skip_special_tokens=False) == text
    assert eos in tokenizer.encode(text)  # the document encoder still reads it as the special token
    r = server.client.post("/tokenize", json={"prompt": text})
    assert r.json()["tokens"] == plain
    chat = server.client.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()["tokens"]
    assert eos not in chat
    out = server.client.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 0})
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == len(plain)
    emb = server.client.post("/v1/embeddings", json={"input": text}).json()
    assert emb["usage"]["prompt_tokens"] == len(plain)


def test_only_the_templates_own_markers_are_special(tokenizer):
    """A template that ends each message with eos: the eos ids in the prompt are the template's,
    one per message, whatever the messages say."""
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    messages = [{"role": "user", "content": "a<|endoftext|>b<|endoftext|>"},
                {"role": "assistant", "content": "<|endoftext|>", "name": "x<|endoftext|>"}]
    ids = encode_chat(tokenizer, messages, template, special_tokens={"eos_token": "<|endoftext|>"})
    assert ids.count(tokenizer.eod_id) == 2
    rendered = render_chat(messages, template, special_tokens={"eos_token": "<|endoftext|>"})
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    # A chat that already holds private-use characters (the stand-ins' plane) comes back whole.
    odd = [{"role": "user", "content": "\U000f0000<|endoftext|>\U000f0001"}]
    got = encode_chat(tokenizer, odd, template, special_tokens={"eos_token": "<|endoftext|>"})
    assert got.count(tokenizer.eod_id) == 1
    assert tokenizer.decode(got, skip_special_tokens=False) == render_chat(odd, template, special_tokens={
        "eos_token": "<|endoftext|>"})


# -- chat templates run off the event loop, within limits (item 10) ---------------------------

HOSTILE = {
    "nested loops": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    "loops over lists": "{% set xs = messages * 50000 %}{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}",
    "huge output": "{% for a in range(99999) %}{% for b in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10**10 }}",
    "huge padding": "{{ 'x'|center(10**10) }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "division by zero": "{{ 1 / 0 }}",
    "type error": "{{ 'a' + 1 }}",
    "syntax error": "{% for %}",
    "raise_exception": "{{ raise_exception('no') }}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_every_chat_template_failure_is_a_400(tokenizer, name):
    cfg = ServeConfig(template_timeout_s=0.5, template_max_chars=100_000)
    ctx = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(tokenizer=tokenizer), chat_template=HOSTILE[name],
                          special_tokens={})
    with pytest.raises(APIError) as e:
        asyncio.run(chat_prompt_ids(ctx, [{"role": "user", "content": "hi"}]))
    assert e.value.status == 400 and e.value.param == "messages"


def test_a_hostile_template_does_not_freeze_the_server(tiny_run, tmp_path):
    """Before: the template ran on the event loop, so /health waited for it (for hours; here the
    health check's own 10 s timeout would fail the test)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "tokenizer" / "chat_template.jinja").write_text(HOSTILE["nested loops"], encoding="utf-8")
    cfg = ServeConfig(run=str(run), template_timeout_s=2.0)
    engine = load_engine(cfg)
    engine.start()
    try:
        with BackgroundServer(create_app(engine, cfg)) as srv:
            answer: dict = {}

            def ask() -> None:
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    answer["r"] = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

            chat = threading.Thread(target=ask)
            chat.start()
            checks = 0
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                while chat.is_alive():  # the server answers while the template runs
                    assert c.get("/health").status_code == 200
                    checks += 1
            chat.join()
            assert checks >= 1
            assert answer["r"].status_code == 400 and "limit" in answer["r"].json()["error"]["message"]
    finally:
        engine.stop()


# -- lone surrogates are a 400 everywhere (item 11) -------------------------------------------

SURROGATE_BODIES = {
    "/v1/completions": b'{"prompt": "a\\ud800b"}',
    "/v1/chat/completions": b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    "/v1/embeddings": b'{"input": ["ok", "\\ud800"]}',
    "/tokenize": b'{"prompt": "\\ud800"}',
    "/detokenize": b'{"tokens": [1], "model": "\\ud800"}',
}


@pytest.mark.parametrize("route", SURROGATE_BODIES)
def test_a_lone_surrogate_is_a_400_on_every_endpoint(server, route):
    r = server.client.post(route, content=SURROGATE_BODIES[route], headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in error_of(r)["message"]
    r = server.client.get("/v1/models/%ED%A0%80")
    assert r.status_code == 404, r.text


# -- abandoned embeddings stop (item 8) --------------------------------------------------------


def test_an_abandoned_embeddings_request_stops_its_work(server):
    """A client that sends 600 inputs and leaves once the work has started: the inputs not yet
    embedded are dropped and its slot freed. Before: all 600 were embedded, the slot held."""
    assert server.client.get("/health").json()["active_requests"] == 0
    app_batcher = server.app.state.embeddings
    before = app_batcher.inputs_embedded
    body = json.dumps({"input": [[1, 2, 3]] * 600}).encode()  # 1800 tokens: within the per-request limit
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: app_batcher.inputs_embedded > before, "the embedding work to start")
    sock.close()
    wait_until(lambda: app_batcher.idle and server.client.get("/health").json()["active_requests"] == 0,
               "the server to drop the abandoned request")
    assert app_batcher.inputs_dropped > 0
    assert app_batcher.inputs_embedded - before < 600
    assert server.client.get("/health").json()["work_in_flight"] == 0


# -- bounded work per request and in flight; --host :: (item 14) -------------------------------


def test_work_per_request_is_bounded(server):
    limit = server.client.get("/health").json()["limits"]["max_request_work"]
    assert limit == 16 * 128  # max_batch x context
    big = server.client.post("/v1/completions", json={"prompt": list(range(1, 101)), "n": 16, "echo": True,
                                                      "logprobs": 20, "max_tokens": 20})
    assert big.status_code == 400 and error_of(big)["param"] == "logprobs", big.text
    ok = server.client.post("/v1/completions", json={"prompt": list(range(1, 41)), "echo": True, "logprobs": 5,
                                                     "max_tokens": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["tokens"]) == 40
    many = server.client.post("/v1/embeddings", json={"input": [list(range(1, 101))] * 30})
    assert many.status_code == 400 and error_of(many)["param"] == "input", many.text


def test_work_in_flight_is_bounded():
    slots = Slots(limit=10, max_work=100)
    slots.acquire(60)
    with pytest.raises(APIError) as e:
        slots.acquire(60)
    assert e.value.status == 429 and e.value.code == "too_much_work_in_flight"
    slots.acquire(40)
    slots.release(60)
    slots.release(40)
    slots.acquire(500)  # a request alone is always taken (the per-request limit bounds it)
    assert (slots.active, slots.work) == (1, 500)


@pytest.mark.parametrize("argv", [["--host", "::"], ["host=::"], ["--host=::"]])
def test_host_takes_an_ipv6_address(argv):
    cls = ServeConfig
    path, overrides = parse_args(COMMANDS["serve"], cls, ["run", *argv])
    assert load_config(cls, path, overrides).host == "::"
