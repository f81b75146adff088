"""pilelm generate --retrieve: passages in the prompt, within the context, sources printed."""

from __future__ import annotations

import pytest

from pilelm.core import cli
from pilelm.retrieval.index import VectorIndex
from pilelm.retrieval.rag import HEAD, assemble_prompt
from pilelm.tokens.tokenizer import load_tokenizer


def test_assembled_prompt_fits_the_budget_and_keeps_rank_order(tiny_run):
    tok = load_tokenizer(tiny_run / "tokenizer")
    passages = ["the quick brown fox jumps over the lazy dog. " * 3, "pack my box with five dozen liquor jugs. " * 3]
    prompt, used = assemble_prompt("what jumps?", passages, tok, budget=1000)
    assert used == 2 and prompt.startswith(HEAD) and prompt.endswith("Question: what jumps?\nAnswer:")
    assert prompt.index("[1] the quick") < prompt.index("[2] pack my box")
    seen = set()
    for budget in (60, 80, 100, 140, 200):
        prompt, used = assemble_prompt("what jumps?", passages, tok, budget=budget)
        assert len(tok.encode(prompt)) <= budget
        seen.add(used)
    assert seen == {0, 1, 2}  # passages are cut or left out as the room shrinks
    with pytest.raises(ValueError, match="the question alone takes"):
        assemble_prompt("what jumps?", passages, tok, budget=30)


def test_generate_with_retrieve_prints_answers_and_sources(tiny_run, tiny_index, capsys):
    index = VectorIndex(tiny_index)
    question = index.chunk_text(index.docs[2]["first_chunk"])
    argv = ["generate", str(tiny_run), "--retrieve", str(tiny_index), "--prompt", question,
            "--max-new-tokens", "8", "--temperature", "0", "--retrieve-k", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(HEAD) and "[1] " in out and f"Question: {question}" in out
    sources = out[out.index("sources for"):]
    assert index.docs[2]["id"] in sources.splitlines()[1]  # the best source is the document the question came from
    prompt = out[: out.index("Answer:") + len("Answer:")]
    assert len(load_tokenizer(tiny_run / "tokenizer").encode(prompt)) + 8 <= 128


def test_generate_without_retrieve_is_unchanged(tiny_run, capsys):
    assert cli.main(["generate", str(tiny_run), "--prompt", "the quick", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick") and "sources" not in out
