"""pilelm serve: POST /v1/chat/completions (chat templates, streaming, stop, n, logprobs, errors),
through the official openai client and raw HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from conftest import serving

from pilelm.tokens.chat import render_chat

KEY = "sk-chat"


def with_client(s):
    s.client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
    return s


@pytest.fixture(scope="module")
def base(tiny_run: Path):
    """A base model's tokenizer: no chat template, so the plain User:/Assistant: one."""
    with serving(tiny_run, api_key=KEY, model_name="tiny", max_batch=8) as s:
        yield with_client(s)


@pytest.fixture(scope="module")
def templated(chat_template_run: Path):
    """The same model with a pass-through chat template in its tokenizer_config.json."""
    with serving(chat_template_run, api_key=KEY, model_name="tiny", max_batch=8) as s:
        yield with_client(s)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_tokenizers_chat_template_renders_the_prompt(templated):
    out = templated.client.chat.completions.create(model="tiny", messages=user("the quick"), max_tokens=30,
                                                   temperature=0)
    (choice,) = out.choices
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith(" brown fox jumps over the lazy dog")
    assert out.usage.prompt_tokens == len(templated.tok.encode("the quick"))
    assert choice.finish_reason == "stop"  # the fitted model ends its text with eos
    stopped = templated.client.chat.completions.create(model="tiny", messages=user("the quick"), max_tokens=30,
                                                       temperature=0, stop=[" jumps", "zz"])
    assert stopped.choices[0].message.content == " brown fox" and stopped.choices[0].finish_reason == "stop"


def test_streaming_chat_gives_the_same_reply_in_chunks(templated):
    whole = templated.client.chat.completions.create(model="tiny", messages=user("pack my"), max_tokens=20,
                                                     temperature=0)
    chunks = list(templated.client.chat.completions.create(
        model="tiny", messages=user("pack my"), max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert len(with_choices) > 3
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content and text.startswith(" box with five dozen")
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_seeded_and_logprobs(templated):
    body = dict(model="tiny", messages=user("the"), max_tokens=8, temperature=1.0, n=3, seed=11,
                logprobs=True, top_logprobs=2)
    first = templated.client.chat.completions.create(**body)
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = templated.client.chat.completions.create(**body)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    for choice in first.choices:
        content = choice.logprobs.content
        assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    greedy = templated.client.chat.completions.create(model="tiny", messages=user("a café in Zürich serves crème"),
                                                      max_tokens=20, temperature=0, logprobs=True)
    text = greedy.choices[0].message.content
    content = greedy.choices[0].logprobs.content
    assert text.startswith(" brûlée to naïve") and all(t.top_logprobs == [] for t in content)
    assert any("\ufffd" in t.token for t in content)  # guard: a character is split over tokens
    # Each split piece decodes to U+FFFD alone, but the tokens' bytes join into the text.
    joined = b"".join(bytes(t.bytes) for t in content if t.token != "<|endoftext|>")
    assert joined.decode("utf-8") == text


def test_base_model_gets_the_plain_transcript_and_stops_at_the_users_turn(base):
    messages = [{"role": "system", "content": "Be brief."}, *user("the quick"),
                {"role": "assistant", "content": "brown fox"}, *user("pack my")]
    out = base.client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    rendered = render_chat(messages, None)
    assert rendered.endswith("User: pack my\n\nAssistant:")
    assert out.usage.prompt_tokens == len(base.tok.encode(rendered))
    assert "\nUser:" not in out.choices[0].message.content
    tokenized = base.http.post("/tokenize", json={"messages": messages}).json()
    assert tokenized["count"] == out.usage.prompt_tokens
    parts = [{"type": "text", "text": "the"}, {"type": "text", "text": "quick"}]
    as_parts = base.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                            "max_tokens": 1}).json()
    assert as_parts["usage"]["prompt_tokens"] == len(base.tok.encode(render_chat(user("the\nquick"), None)))


def test_malformed_chat_requests_get_400_naming_the_problem(base):
    bad = [
        ({"max_tokens": 5}, "messages is required"),
        ({"messages": []}, "non-empty"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [1]}, "messages[0] must be an object"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "'robot'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be"),
        ({"messages": [{"role": "user", "content": None}]}, "content must be"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text"),
        ({"messages": [*user("a"), {"role": "assistant", "content": "b", "tool_calls": []}]},
         "messages[1]: unsupported field 'tool_calls'"),
        ({"messages": user("a"), "tools": [{"type": "function"}]}, "tools is not supported"),
        ({"messages": user("a"), "top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"messages": user("a"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": user("a"), "max_tokens": 10**6}, "max_tokens"),
        ({"messages": user("a"), "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": user("the " * 200)}, "prompt is"),
        ({"messages": user("a"), "n": 9}, "at most 8"),
        ({"messages": user("a"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": user("a"), "temperature": "1"}, "temperature"),
        ({"messages": user("a"), "frobnicate": 1}, "Unrecognized request argument supplied: frobnicate"),
    ]
    for body, needle in bad:
        r = base.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", (body, err)
    assert base.http.post("/v1/chat/completions", json={"messages": user("a"), "model": "gpt-4"}).status_code == 404
    assert httpx.post(f"{base.url}/v1/chat/completions", json={"messages": user("a")}).status_code == 401
    with pytest.raises(openai.BadRequestError):
        base.client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    ok = base.client.chat.completions.create(model="tiny", messages=user("the quick"), max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
