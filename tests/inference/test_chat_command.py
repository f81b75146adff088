"""`pilelm chat` and `generate --chat`: the template, history, /reset, /exit, streaming, context
kept within the block size, and the refusal (with the way out) on a run without a template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pilelm.core.cli import main
from pilelm.inference.chat_session import ChatSession, open_session
from pilelm.inference.sampling import SamplingParams

GREEDY = ["--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]


def chat_cli(run, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pilelm", "chat", str(run), *GREEDY, *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_chat_streams_replies_resets_and_exits(chat_template_run):
    proc = chat_cli(chat_template_run, "the quick\n/reset\npack my\n/exit\nthe quick\n")
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert replies[0].startswith(" brown fox")  # the pass-through template: the model recites its text
    assert "(conversation reset)" in replies[1]
    # after /reset the conversation is forgotten: the reply is the one a fresh session gives
    fresh = open_session(chat_template_run, SamplingParams(max_new_tokens=8, temperature=0), device="cpu")
    assert replies[2] == fresh.send("pack my")
    assert len(replies) == 3  # nothing read after /exit


def test_history_reaches_the_model(chat_template_run):
    s = open_session(chat_template_run, SamplingParams(max_new_tokens=6, temperature=0), device="cpu")
    first = s.send("the quick")
    streamed: list[str] = []
    s.send("over the", on_text=streamed.append)
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert "".join(streamed).strip() == s.history[-1]["content"]
    assert s.fitted_prompt().startswith("the quick" + first.strip())  # the template saw turn one


def test_old_turns_are_dropped_to_fit_the_context(chat_template_run):
    s = open_session(chat_template_run, SamplingParams(max_new_tokens=100, temperature=0), system="sys: ",
                     device="cpu")
    room = s.block_size - 100
    for i in range(6):
        s.send(f"the quick brown fox {i}")
        prompt = s.fitted_prompt()
        assert len(s.tokenizer.encode(prompt)) <= room
    assert s.history[0]["role"] == "user" and len(s.history) < 12  # oldest exchanges went
    assert prompt.startswith("sys: ")  # the system prompt stays
    assert s.history[-2]["content"] == "the quick brown fox 5"


def test_a_run_without_a_template_is_refused_with_the_way_to_get_one(tiny_run, capsys):
    proc = chat_cli(tiny_run, "hello\n")
    assert proc.returncode == 1
    assert "has no chat template" in proc.stderr and "--task sft" in proc.stderr
    assert main(["generate", str(tiny_run), "--chat", "--prompt", "hi", *GREEDY]) == 1
    assert "--task sft" in capsys.readouterr().err
    # the plain transcript, when asked for, works on a base model
    proc = chat_cli(tiny_run, "the quick\n", "--plain-template")
    assert proc.returncode == 0 and proc.stdout.strip()


def test_generate_chat_prints_the_reply_only(chat_template_run, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    capsys.readouterr()
    assert main(["generate", str(chat_template_run), "--chat", "--prompt", "the quick", *GREEDY,
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    rec = json.loads(out.read_text())
    assert rec["prompt"] == "the quick" and printed[0] == rec["completion"]  # no prompt echoed
    session = open_session(chat_template_run, SamplingParams(max_new_tokens=8, temperature=0), device="cpu")
    assert session.send("the quick") == rec["completion"]


def test_max_new_tokens_must_leave_room(chat_template_run):
    s = open_session(chat_template_run, SamplingParams(max_new_tokens=8, temperature=0), device="cpu")
    with pytest.raises(ValueError, match="below the model's context"):
        ChatSession(s.model, s.tokenizer, s.template, SamplingParams(max_new_tokens=s.block_size))
