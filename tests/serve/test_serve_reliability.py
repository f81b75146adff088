"""pilelm serve under hostile or careless requests (issue 29): one request never fails the
batch, text from a request is text, templates cannot freeze the server, bad Unicode is a 400,
abandoned work stops, and the work per request is bounded."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from pilelm.inference.sampling import SamplingParams
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine
from pilelm.serve.engine import Engine, Failed, Finished, RowSpec, Submission, TextDelta

KEY = "sk-test-rel"


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    cfg = ServeConfig(run=str(tiny_run), api_key=KEY, model_name="tiny", max_batch=16, max_concurrent=32)
    engine = load_engine(cfg)
    engine.start()
    with BackgroundServer(create_app(engine, cfg)) as srv:
        client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=srv.url, engine=engine, client=client, cfg=cfg)
        client.close()
    engine.stop()


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
