"""Reading labelled data: records, CoNLL / JSONL tags and their schemes, punctuation labels."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from ft_helpers import DATA

from pilelm.finetune.metrics import classification_metrics, entity_metrics, punctuation_metrics
from pilelm.finetune.punct import label_text, restore
from pilelm.finetune.records import DataError, read_text_records
from pilelm.finetune.tags import check_scheme, detect_scheme, read_conll, read_tagged


def test_records_jsonl_csv_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a b", "label": "x"}, {"text": "", "label": "y"}, {"text": "c", "label": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("text,label\na b,x\n,y\nc,y\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        skips: Counter[str] = Counter()
        recs = read_text_records(tmp_path / name, "text", "label", skips)
        assert [(r.text, r.label) for r in recs] == [("a b", "x"), ("c", "y")]
        assert skips == {"empty_text": 1}  # counted, not silently lost
    assert read_text_records(tmp_path / "d.csv", "text", "label")[1].where.endswith("d.csv:4")


def test_missing_label_column_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: no 'label' column"):
        read_text_records(p, "text", "label")
    with pytest.raises(DataError, match=r"d\.jsonl:1: no 'meta\.kind' column"):
        read_text_records(p, "text", "meta.kind")


def test_conll_reads_sentences_and_skips_docstart():
    sents = read_conll(DATA / "tiny.conll")
    assert len(sents) == 8
    assert sents[1].tokens[:2] == ["Bob", "Smith"] and sents[1].tags[:2] == ["B-PER", "I-PER"]
    assert sents[0].where[0].endswith("tiny.conll:3")
    assert detect_scheme(sents) == "bio"
    for s in sents:
        check_scheme(s, "bio")


def test_conll_wrong_column_count_is_an_error(tmp_path):
    p = tmp_path / "bad.conll"
    p.write_text("Alice NNP B-PER\nlives VBZ O\n\nBob B-PER\n")
    with pytest.raises(DataError, match=r"bad\.conll:4: 2 columns, but line 1 has 3"):
        read_conll(p)


def test_invalid_bio_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "iob1.conll"
    p.write_text("Alice I-PER\nlives O\nin O\nParis I-LOC\n")
    (s,) = read_conll(p)
    with pytest.raises(DataError, match=r"iob1\.conll:1: I-PER does not continue an entity"):
        check_scheme(s, "bio")


def test_bioes_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"tokens": ["New", "York", "is", "big", "Bob"], "tags": ["B-LOC", "E-LOC", "O", "O", "S-PER"]})
                 + "\n" + json.dumps({"tokens": ["x", "y"], "tags": ["B-LOC", "O"]}) + "\n")
    sents = read_tagged(p)
    assert detect_scheme(sents) == "bioes"
    check_scheme(sents[0], "bioes")
    with pytest.raises(DataError, match=r"t\.jsonl:2: `O` inside an entity"):
        check_scheme(sents[1], "bioes")
    p.write_text(json.dumps({"tokens": ["a"], "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match="1 tokens but 2 tags"):
        read_tagged(p)


def test_punct_labels_and_restore_round_trip():
    text = 'Hello, world. "Is it" raining? Yes - it is!'
    lw = label_text(text)
    assert lw.words == ["hello", "world", "is", "it", "raining", "yes", "it", "is"]
    assert lw.labels == ["COMMA+Cap", "PERIOD+lower", "O+Cap", "O+lower", "QUESTION+lower", "O+Cap",
                         "O+lower", "PERIOD+lower"]  # the lone dash is dropped
    assert restore(lw.words, lw.labels) == "Hello, world. Is it raining? Yes it is."


def test_metrics():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert m["accuracy"] == 0.75 and m["confusion"] == [[1, 1], [0, 2]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    e = entity_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    assert e["precision"] == 1.0 and e["recall"] == 0.5 and e["per_type"]["PER"]["f1"] == 1.0
    p = punctuation_metrics(["COMMA+lower", "O+Cap", "PERIOD+lower"], ["COMMA+lower", "O+lower", "COMMA+lower"])
    assert p["per_mark"]["COMMA"]["precision"] == 0.5 and p["per_mark"]["PERIOD"]["recall"] == 0.0
    assert p["micro_f1"] == pytest.approx(0.5) and p["case_f1"] == 0.0


def test_length_grouped_batches_cover_each_epoch_and_pad_little():
    import numpy as np

    from pilelm.training.order import batch_indices

    rng = np.random.default_rng(0)
    n, bs = 1000, 16
    lengths = rng.integers(5, 200, n)
    steps = range(n // bs + 5)  # past the epoch boundary
    grouped = [batch_indices(s, bs, n, 7, lengths) for s in steps]
    plain = [batch_indices(s, bs, n, 7) for s in steps]
    flat = [i for b in grouped for i in b]
    assert sorted(flat[:n]) == list(range(n))  # each example once per epoch
    assert grouped == [batch_indices(s, bs, n, 7, lengths) for s in steps]  # a function of (seed, step)

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    assert padding(grouped) < padding(plain) / 5


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(("row", "message"), [
    ({"text": "a", "label": ["a", "b"]}, r"label 'label' is \[\"a\", \"b\"\] \(list\)"),
    ({"text": "a", "label": 1.5}, r"label 'label' is 1.5 \(float\)"),
    ({"text": "a", "label": True}, r"label 'label' is true \(bool\)"),
    ({"text": 7, "label": "x"}, r"text 'text' is 7 \(int\)"),
    ({"text": {"t": "a"}, "label": "x"}, r"text 'text' is \{\"t\": \"a\"\} \(dict\)"),
])
def test_a_label_or_text_that_is_not_a_string_is_refused_naming_the_line(tmp_path, row, message):
    p = tmp_path / "d.jsonl"
    _jsonl(p, [{"text": "ok", "label": "x"}, row])
    with pytest.raises(DataError, match=r"d\.jsonl:2: " + message):
        read_text_records(p, "text", "label")


def test_integer_labels_are_classes_but_not_mixed_with_strings(tmp_path):
    from pilelm.finetune.records import require_one_label_kind

    p = tmp_path / "d.jsonl"
    _jsonl(p, [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    records = read_text_records(p, "text", "label")
    assert [r.label for r in records] == ["0", "1"]
    require_one_label_kind(records)
    q = tmp_path / "e.jsonl"
    _jsonl(q, [{"text": "c", "label": "1"}])
    with pytest.raises(DataError, match=r"labels mix strings \(.*e\.jsonl:1: '1'\) and integers \(.*d\.jsonl:1: 0\)"):
        require_one_label_kind(records + read_text_records(q, "text", "label"))


def test_ner_tokens_and_tags_must_be_strings(tmp_path):
    p = tmp_path / "t.jsonl"
    _jsonl(p, [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a", 1], "tags": ["O", "O"]}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: 'tokens' holds 1 \(int\)"):
        read_tagged(p)
    _jsonl(p, [{"tokens": ["a"], "tags": [["B-PER"]]}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: 'tags' holds \[\"B-PER\"\] \(list\)"):
        read_tagged(p)


@pytest.mark.parametrize("line", ["a b,x,extra", "a b"])
def test_a_csv_row_of_another_width_than_its_header_is_refused(tmp_path, line):
    p = tmp_path / "d.csv"
    p.write_text(f"text,label\nc,y\n{line}\n")
    with pytest.raises(DataError, match=r"d\.csv:3: \d fields, but the header has 2"):
        read_text_records(p, "text", "label")


def test_bytes_that_are_not_utf8_are_refused_naming_file_and_line(tmp_path):
    import zstandard

    bad = "é".encode("latin-1")
    cases = {"d.jsonl": b'{"text": "a", "label": "x"}\n{"text": "' + bad + b'", "label": "y"}\n',
             "d.csv": b"text,label\na,x\n" + bad + b",y\n",
             "d.conll": b"Alice B-PER\n\n" + bad + b" O\n"}
    cases["d.jsonl.zst"] = zstandard.ZstdCompressor().compress(cases["d.jsonl"])
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        read = read_conll if name.endswith(".conll") else lambda p: read_text_records(p, "text", "label")
        line = 2 if name.startswith("d.jsonl") else 3
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}:{line}: not UTF-8"):
            read(tmp_path / name)


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_record(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufefftext,label\na b,x\n".encode())
    (tmp_path / "d.jsonl").write_bytes(('\ufeff{"text": "a b", "label": "x"}\n').encode())
    for name in ("d.csv", "d.jsonl"):
        assert [(r.text, r.label) for r in read_text_records(tmp_path / name, "text", "label")] == [("a b", "x")]
