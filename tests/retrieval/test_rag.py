"""pilelm generate --retrieve: passages in the prompt, within the context, sources printed."""

from __future__ import annotations

import json

import pytest

from pilelm.core import cli
from pilelm.retrieval.index import VectorIndex
from pilelm.retrieval.rag import HEAD, assemble_prompt, passage_caps
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
    assert "Question: what jumps?\nAnswer:" in assemble_prompt("what jumps?", passages, tok, budget=60)[0]
    with pytest.raises(ValueError, match="the question alone takes"):
        assemble_prompt("what jumps?", passages, tok, budget=30)


def test_passages_share_the_room_and_each_keeps_its_head(tiny_run):
    tok = load_tokenizer(tiny_run / "tokenizer")
    long = ["alpha beta gamma delta " * 40, "one two three four five " * 40, "red green blue " * 40]
    budget = 140
    prompt, used = assemble_prompt("which colour?", long, tok, budget)
    assert used == 3 and len(tok.encode(prompt)) <= budget
    body = prompt[len(HEAD): prompt.index("Question:")]
    blocks = [b for b in body.split("\n\n") if b]
    assert [b[:4] for b in blocks] == ["[1] ", "[2] ", "[3] "]
    # Each passage keeps its start (cut from the right) and gets a similar share of the room.
    assert blocks[0].startswith("[1] alpha beta") and blocks[2].startswith("[3] red green")
    sizes = [len(tok.encode(b)) for b in blocks]
    assert max(sizes) - min(sizes) <= 3
    # A short passage takes only what it needs; the others share the rest.
    prompt2, used2 = assemble_prompt("which colour?", [long[0], "tiny passage.", long[2]], tok, budget)
    assert used2 == 3 and "[2] tiny passage.\n\n" in prompt2
    third = "[3] " + prompt2.split("[3] ")[1].split("\n\n")[0] + "\n\n"
    assert len(tok.encode(third)) > sizes[2]


def test_water_filling_caps():
    assert passage_caps([10, 10, 10], 60) == 10  # everything fits: no cut
    assert passage_caps([100, 100], 60) == 30  # equal shares
    assert passage_caps([5, 100, 100], 65) == 30  # the short one's spare share goes to the others
    assert sum(min(n, passage_caps([7, 50, 90], 80)) for n in (7, 50, 90)) <= 80


def test_an_empty_answer_is_never_printed_as_nothing(tiny_run, tiny_index, monkeypatch, capsys, caplog):
    from pilelm.inference import generate as generate_mod

    monkeypatch.setattr(generate_mod, "generate", lambda *args, **kwargs: [""])
    assert cli.main(["generate", str(tiny_run), "--retrieve", str(tiny_index), "--prompt", "the quick fox",
                     "--max-new-tokens", "4", "--retrieve-mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert "Answer:\n(the sample: no text: the model ended at once" in out and "1 of 1 samples are empty" in caplog.text


def test_generate_with_retrieve_prints_answers_and_sources(tiny_run, tiny_index, capsys):
    index = VectorIndex(tiny_index)
    question = index.chunk_text(index.docs[2]["first_chunk"])
    argv = ["generate", str(tiny_run), "--retrieve", str(tiny_index), "--prompt", question,
            "--max-new-tokens", "8", "--temperature", "0", "--retrieve-k", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    # The question and its answer, not the assembled prompt; then the sources.
    shown = out[: out.index("\nsources for")]
    assert shown.startswith(f"Question: {question}\nAnswer:") and HEAD not in shown and "[1] " not in shown
    assert shown.split("\nAnswer:", 1)[1].strip()
    sources = out[out.index("sources for"):]
    assert index.docs[2]["id"] in sources.splitlines()[1]  # the best source is the document the question came from


def test_generate_with_retrieve_writes_the_prompt_that_fits(tiny_run, tiny_index, tmp_path):
    index = VectorIndex(tiny_index)
    question = index.chunk_text(index.docs[2]["first_chunk"])[:80]
    out = tmp_path / "rag.jsonl"
    assert cli.main(["generate", str(tiny_run), "--retrieve", str(tiny_index), "--prompt", question,
                     "--max-new-tokens", "8", "--temperature", "0", "--retrieve-k", "3", "-o", str(out),
                     "--retrieve-mode", "bm25"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["prompt"].startswith(HEAD + "[1] ") and rec["prompt"].endswith(f"Question: {question}\nAnswer:")
    assert len(load_tokenizer(tiny_run / "tokenizer").encode(rec["prompt"])) + 8 <= 128


def test_generate_without_retrieve_is_unchanged(tiny_run, capsys):
    assert cli.main(["generate", str(tiny_run), "--prompt", "the quick", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick") and "sources" not in out
