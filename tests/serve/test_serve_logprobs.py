"""pilelm serve: completions logprobs and echo (OpenAI / vLLM shapes), the tokenizer routes,
and lm-evaluation-harness's local-completions model scoring against a live server."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from conftest import assert_lm_eval_matches_a_plain_forward, lm_eval_tiny_task, serving

from pilelm.inference.decode_batch import DecodeBatch
from pilelm.inference.sampling import SamplingParams
from pilelm.tokens.tokenizer import load_tokenizer
from pilelm.training.checkpoint import load_for_inference

KEY = "sk-logprobs"


@pytest.fixture(scope="module")
def server(tiny_run: Path):
    with serving(tiny_run, api_key=KEY, model_name="tiny", max_batch=16) as s:
        s.client = s.http
        yield s


@pytest.fixture(scope="module")
def reference(tiny_run: Path):
    """log p(ids[j] | ids[:j]) for j >= 1 from one plain forward of the whole sequence."""
    model, _, tok_dir = load_for_inference(tiny_run)
    tok = load_tokenizer(tok_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:  # (len(ids) - 1, V)
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)

    return SimpleNamespace(tok=tok, logprobs=logprobs)


def complete(server, **body) -> dict:
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_generated_tokens_carry_their_logprobs_and_top_k(server, reference):
    out = complete(server, prompt="the quick", max_tokens=8, temperature=0, logprobs=3)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert n == 8 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    # The same numbers as one plain forward over prompt + completion (no second forward served them).
    prompt = reference.tok.encode("the quick")
    generated = reference.tok.encode(choice["text"])
    ids = prompt + generated
    ref = reference.logprobs(ids)
    expected = [ref[j - 1, ids[j]].item() for j in range(len(prompt), len(ids))]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    for tok_text, tok_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 3 <= len(top) <= 4 and top[tok_text] == tok_lp
        assert tok_lp == max(top.values())  # greedy: the chosen token is the most likely
        assert all(v <= 0 for v in top.values())
    # Offsets: where each token's text starts in the returned text.
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"]


def test_sampled_tokens_report_the_models_distribution(server):
    out = complete(server, prompt="pack my", max_tokens=6, temperature=1.5, top_k=5, seed=3, logprobs=0)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 6
    assert all(len(top) == 1 and next(iter(top)) == t for t, top in zip(lp["tokens"], lp["top_logprobs"],
                                                                         strict=True))


def test_echo_with_max_tokens_0_scores_the_prompt(server, reference):
    ids = reference.tok.encode("a café in Zürich serves crème brûlée")
    out = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    (choice,) = out["choices"]
    assert choice["text"] == reference.tok.decode(ids) and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference.logprobs(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([ref[j - 1, ids[j]].item() for j in range(1, len(ids))],
                                                     abs=1e-4)
    # Offsets index the echoed text: every whole token's string starts where it says.
    text = choice["text"]
    for tok_text, off in zip(lp["tokens"], lp["text_offset"], strict=True):
        if "\ufffd" not in tok_text:
            assert text[off:off + len(tok_text)] == tok_text


def test_echo_and_generation_stream_the_same_logprobs(server):
    body = {"prompt": ["the quick", "pack my box"], "max_tokens": 5, "echo": True, "logprobs": 1,
            "temperature": 0}
    whole = complete(server, **body)["choices"]
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for choice in whole:
        parts = [c["choices"][0] for c in events if c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        merged: dict[str, list] = {k: [] for k in choice["logprobs"]}
        for p in parts:
            for k, v in (p["logprobs"] or {}).items():
                merged[k] += v
        assert merged == choice["logprobs"]
        # prompt tokens first (the first without context), then the 5 generated ones
        assert merged["token_logprobs"][0] is None and len(merged["tokens"]) > 5


def test_decode_batch_logprobs_do_not_depend_on_the_batch(tiny_run):
    model, _, _ = load_for_inference(tiny_run)
    params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2)

    def run(prompts: list[list[int]]) -> tuple[dict, dict]:
        batch = DecodeBatch(model, None)
        ids = batch.add(prompts, [params] * len(prompts))
        scored = dict(batch.prompt_logprobs)
        steps: dict[int, list] = {i: [] for i in ids}
        while len(batch):
            batch.step()
            for row_id, entry in batch.logprobs.items():
                steps[row_id].append(entry)
        return scored[ids[0]], steps[ids[0]]

    alone = run([[5, 6, 7, 8]])
    padded = run([[5, 6, 7, 8], [9] * 11])  # left-padded next to a longer row
    assert alone[0][0] is None and len(alone[0]) == 4 and len(alone[1]) == 4
    for a, b in zip(alone[0][1:] + alone[1], padded[0][1:] + padded[1], strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_tokenizer_routes_match_the_served_tokenizer(server, reference):
    ids = reference.tok.encode("the quick brown fox")
    r = server.client.post("/tokenize", json={"prompt": "the quick brown fox", "add_special_tokens": False})
    assert r.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids}
    assert server.client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "the quick brown fox"}
    info = server.client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "User:" in info["chat_template"]
    chat = server.client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == reference.tok.encode("User: hi\n\nAssistant:")
    assert server.client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert server.client.post("/tokenize", json={}).status_code == 400
    assert httpx.get(f"{server.url}/tokenizer_info").status_code == 401  # the key is required here too


def test_lm_eval_local_completions_scores_loglikelihood_against_the_server(server, tiny_run, tmp_path,
                                                                           monkeypatch):
    """lm-evaluation-harness's local-completions model (echo + logprobs, the server's tokenizer
    through /tokenizer_info and /tokenize) gives the log-likelihoods one plain forward gives."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={server.url}/v1/completions,auth_token={KEY},num_concurrent=1,"
                   "max_retries=1,tokenized_requests=True,max_length=128",
        tasks=["pilelm_tiny"], batch_size=1, bootstrap_iters=0, log_samples=True,
        task_manager=lm_eval_tiny_task(tmp_path),
    )
    assert_lm_eval_matches_a_plain_forward(results, tiny_run)
    assert server.engine.snapshot()["rows_finished"] >= 8  # every choice went through the engine
