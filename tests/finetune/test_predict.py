"""`pilelm predict` on fine-tuned tiny models: every input shape (arguments, stdin, JSONL, CSV,
Parquet, txt), the JSONL fields of each task, and the predictions equal to the model's argmax."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pilelm.core.cli import main
from pilelm.finetune.predict import Predictor, group_entities, word_spans


@pytest.fixture(scope="session")
def fine_tunes(head_fine_tunes) -> dict[str, Path]:
    return head_fine_tunes


def predict_lines(argv: list[str], capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", *argv, "--device", "cpu"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_classify_from_arguments_matches_the_models_argmax(fine_tunes, capsys):
    texts = ["apple banana cherry grape", "zebra lion tiger", "melon horse apple camel apple"]
    rows = predict_lines([str(fine_tunes["classify"]), *texts, "--top-k", "2"], capsys)
    assert [r["text"] for r in rows] == texts
    p = Predictor(fine_tunes["classify"], "cpu")
    enc = p.encoder
    for text, row in zip(texts, rows, strict=True):
        ids = torch.tensor([enc.tok.encode(text)])
        with torch.no_grad():
            probs = p.model(ids, torch.ones_like(ids)).softmax(-1)[0]
        assert row["label"] == p.labels[int(probs.argmax())]
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [t["label"] for t in row["top_k"]] == [p.labels[i] for i in probs.argsort(descending=True).tolist()]
        assert sum(t["score"] for t in row["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_inputs_from_stdin_and_every_file_format_agree(fine_tunes, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["apple banana cherry", "zebra lion", "grape melon"]
    model = str(fine_tunes["classify"])
    expected = [r["label"] for r in predict_lines([model, *texts], capsys)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": {"t": t}}) + "\n" for t in texts))
    (tmp_path / "a.csv").write_text("id,body\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    for name, column in (("a.jsonl", "body.t"), ("a.csv", "body"), ("a.parquet", "body"), ("a.txt", "x")):
        rows = predict_lines([model, "--data", str(tmp_path / name), "--text-column", column], capsys)
        assert [r["label"] for r in rows] == expected, name
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts) + "\n"))
    assert [r["label"] for r in predict_lines([model], capsys)] == expected
    # -o writes the same lines to a file
    assert main(["predict", model, *texts, "-o", str(tmp_path / "out.jsonl")]) == 0
    assert [json.loads(x)["label"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == expected


def test_a_missing_column_names_the_file_and_line(fine_tunes, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "apple"}\n{"body": "x"}\n')
    assert main(["predict", str(fine_tunes["classify"]), "--data", str(tmp_path / "bad.jsonl")]) == 1
    assert f"{tmp_path / 'bad.jsonl'}:2" in capsys.readouterr().err


def test_ner_spans_have_character_offsets(fine_tunes, capsys):
    text = "Alice lives in Paris, and Bob Smith works for Acme Corp in Berlin."
    rows = predict_lines([str(fine_tunes["ner"]), text], capsys)
    entities = rows[0]["entities"]
    assert entities, "the fitted model finds entities in a sentence like its training data"
    for e in entities:
        assert set(e) == {"entity_group", "score", "word", "start", "end"}
        assert text[e["start"]:e["end"]] == e["word"] and 0 < e["score"] <= 1
        assert e["entity_group"] in {"PER", "LOC", "ORG", "MISC"}


def test_long_inputs_are_tagged_window_by_window(fine_tunes):
    p = Predictor(fine_tunes["ner"], "cpu", batch_size=3)
    words = ("Alice lives in Paris . " * 60).split()  # far longer than max_length tokens
    tags = p.tag_words([words, words[:5]])
    assert len(tags[0]) == len(words) and len(tags[1]) == 5
    # A causal model's label of a word depends on the words before it only: the first window of
    # the long text labels its first five words as the five-word text is labelled.
    assert [t for t, _ in tags[0][:5]] == [t for t, _ in tags[1]]
    assert [s for _, s in tags[0][:5]] == pytest.approx([s for _, s in tags[1]], abs=1e-5)


def test_punct_restores_the_same_words(fine_tunes, capsys):
    text = "the cat saw the park did a dog like paris"
    rows = predict_lines([str(fine_tunes["punct"]), text], capsys)
    assert rows[0]["text"] == text
    assert [w.strip(",.?").lower() for w in rows[0]["restored"].split()] == text.split()


def test_group_entities_follows_simple_aggregation():
    text = "Bob Smith met Ann in New York ."
    spans = word_spans(text)
    assert [w for w, _, _ in spans] == ["Bob", "Smith", "met", "Ann", "in", "New", "York", "."]
    tags = [("B-PER", 0.9), ("I-PER", 0.7), ("O", 1.0), ("B-PER", 0.8), ("O", 1.0), ("B-LOC", 0.6),
            ("I-LOC", 0.4), ("O", 1.0)]
    got = group_entities(text, spans, tags)
    assert [(e["entity_group"], e["word"]) for e in got] == [("PER", "Bob Smith"), ("PER", "Ann"), ("LOC", "New York")]
    assert got[0]["score"] == pytest.approx(0.8) and got[2]["start"] == text.index("New")
    # a type change starts a new entity; BIOES S- and E- close one
    bioes = [("S-PER", 0.5), ("B-PER", 0.5), ("O", 1), ("B-LOC", 1), ("E-LOC", 1), ("I-ORG", 1), ("O", 1), ("O", 1)]
    assert [e["word"] for e in group_entities(text, spans, bioes)] == ["Bob", "Smith", "Ann in", "New"]


def test_a_non_head_model_is_refused_with_the_fix(tiny_run, capsys):
    assert main(["predict", str(tiny_run), "hello"]) == 1
    assert "finetune" in capsys.readouterr().err


def test_progress_lines_when_not_a_terminal(fine_tunes, tmp_path):
    texts = tmp_path / "many.txt"
    texts.write_text("apple banana\nzebra lion\n" * 50)
    proc = subprocess.run([sys.executable, "-m", "pilelm", "predict", str(fine_tunes["classify"]), "--data",
                           str(texts), "-o", str(tmp_path / "o.jsonl"), "--device", "cpu"],
                          capture_output=True, text=True, check=True)
    assert "\r" not in proc.stderr  # no bar redrawn into a log
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 100


def test_the_python_api_answers_as_the_command(fine_tunes, capsys):
    import pilelm

    clf = pilelm.load(fine_tunes["classify"], device="cpu")
    assert type(clf).__name__ == "FinetunedModel" and clf.task == "classify"
    rows = predict_lines([str(fine_tunes["classify"]), "apple banana", "zebra lion", "--top-k", "2"], capsys)
    assert clf.classify(["apple banana", "zebra lion"], top_k=2) == [{k: r[k] for k in ("label", "score", "top_k")}
                                                                      for r in rows]
    assert clf.classify("apple banana")["label"] == rows[0]["label"]
    with pytest.raises(ValueError, match="classify model"):
        clf.tag("Alice")
    ner = pilelm.load(fine_tunes["ner"], device="cpu")
    text = "Alice lives in Paris ."
    assert ner.tag(text) == predict_lines([str(fine_tunes["ner"]), text], capsys)[0]["entities"]
    punct = pilelm.load(fine_tunes["punct"], device="cpu")
    assert punct.punctuate(["the cat saw the park"])[0].lower().startswith("the cat")
