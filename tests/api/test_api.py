"""The Python API: `pilelm.load` and its methods agree with the commands they stand for, and
the stage functions build the configs the command line builds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import pilelm
from pilelm.core.cli import main, parse_args
from pilelm.core.config import ConfigError, load_config
from pilelm.core.stages import COMMANDS
from pilelm.stage_functions import FUNCTIONS, build_config


@pytest.fixture(scope="module")
def lm(tiny_run):
    return pilelm.load(tiny_run, device="cpu")


def test_import_is_lazy():
    code = "import sys, pilelm; assert 'torch' not in sys.modules and 'pilelm.api' not in sys.modules; print(pilelm.load)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "function load" in out


def test_generate_is_the_commands_output(lm, tiny_run, tmp_path):
    out = tmp_path / "g.jsonl"
    assert main(["generate", str(tiny_run), "--prompt", "the quick", "--prompt", "pack my", "--temperature", "0",
                 "--max-new-tokens", "8", "--output", str(out), "--device", "cpu"]) == 0
    cli = [json.loads(x)["completion"] for x in out.read_text().splitlines()]
    assert lm.generate(["the quick", "pack my"], max_new_tokens=8, temperature=0) == cli
    assert lm.generate("the quick", max_new_tokens=8, temperature=0) == cli[0]


def test_score_is_the_log_probability_of_one_forward(lm):
    text = "the quick brown fox jumps over the lazy dog."
    got = lm.score(text)
    ids = [lm.tokenizer.eod_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    expected = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert got["logprob"] == pytest.approx(expected, abs=1e-3)
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == len(text.encode())
    assert got["bits_per_byte"] == pytest.approx(-expected / math.log(2) / len(text.encode()), rel=1e-4)
    fitted, noise = lm.score([text, "qzx vvk jjj"])
    assert fitted["bits_per_byte"] < noise["bits_per_byte"]  # the model was fitted to the first


def test_embed_is_the_encoders(lm, tiny_run):
    from pilelm.inference.text_encoder import TextEncoder

    vecs = lm.embed(["the quick brown fox", "pack my box"])
    ref = TextEncoder.from_run(tiny_run, device="cpu").embed_queries(["the quick brown fox", "pack my box"])
    np.testing.assert_allclose(vecs, ref, atol=1e-5)
    assert lm.embed("one").shape == (vecs.shape[1],)
    assert np.linalg.norm(vecs, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_chat_needs_a_template(lm, chat_template_run):
    from pilelm.tokens.chat import NoChatTemplate

    with pytest.raises(NoChatTemplate, match="--task sft"):
        lm.chat("hello")
    chat = pilelm.load(chat_template_run, device="cpu")
    reply = chat.chat("the quick", temperature=0, max_new_tokens=6)
    assert reply.startswith("brown fox")
    # a conversation: the earlier turns reach the template (pass-through: all contents joined)
    turns = [{"role": "user", "content": "the"}, {"role": "assistant", "content": " quick"},
             {"role": "user", "content": " brown"}]
    assert chat.chat(turns, temperature=0, max_new_tokens=6) == chat.chat("the quick brown", temperature=0,
                                                                          max_new_tokens=6)
    with pytest.raises(ValueError, match="end with a user message"):
        chat.chat(turns[:2])


def test_every_command_is_a_function():
    assert set(FUNCTIONS.values()) == set(COMMANDS)
    import pilelm.finetune.stage  # noqa: F401  (sets pilelm.finetune to the package)

    for name in ("prepare", "tokenize", "train", "eval", "fine_tune", "predict", "chat", "tokenizer_train", "import_",
                 "serve_http"):
        assert callable(getattr(pilelm, name)), name
        assert getattr(pilelm, name).__name__ == name
    with pytest.raises(AttributeError):
        pilelm.no_such_stage  # noqa: B018


def test_stage_functions_build_the_command_lines_config(tiny_run):
    argv = [str(tiny_run), "--task", "ner", "--data", "a.conll", "--data", "b.conll", "loop.max_steps=5",
            "--optim.lr", "1e-3"]
    cls, _ = COMMANDS["finetune"].load()
    path, overrides = parse_args(COMMANDS["finetune"], cls, argv)
    from_cli = load_config(cls, path, overrides)
    from_api = build_config("finetune", (tiny_run,), task="ner", data=["a.conll", "b.conll"], optim={"lr": 1e-3},
                            **{"loop.max_steps": 5})
    assert from_api == from_cli
    with pytest.raises(ConfigError, match="lable_column"):
        build_config("finetune", (tiny_run,), lable_column="x")


def test_a_stage_function_runs_the_stage(tiny_run, tmp_path):
    out = pilelm.generate(tiny_run, prompt=["the quick"], temperature=0, max_new_tokens=5, device="cpu",
                          output=tmp_path / "s.jsonl")
    assert out == tmp_path / "s.jsonl"
    assert json.loads(out.read_text())["completion"].startswith(" brown")
