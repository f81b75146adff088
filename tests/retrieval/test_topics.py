"""pilelm topics: k-means clusters named by class-based TF-IDF, a table and a map."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from pilelm.core import cli
from pilelm.core.manifest import read_manifest
from pilelm.retrieval.topics import c_tf_idf


def test_c_tf_idf_ranks_a_class_only_word_above_shared_ones():
    counts = [Counter({"fox": 3, "text": 5}), Counter({"jugs": 2, "text": 5}), Counter({"text": 4, "cafe": 1})]
    words = c_tf_idf(counts, top=2)
    assert [w for w, _ in words[0]] == ["fox", "text"]
    assert words[1][0][0] == "jugs" and words[2][0][0] == "cafe"


def test_topics_clusters_every_document_and_names_each_cluster(tiny_index, tmp_path):
    out = tmp_path / "topics"
    assert cli.main(["topics", str(tiny_index), "-k", "3", "-o", str(out), "--terms", "4"]) == 0
    topics = json.loads((out / "topics.json").read_text())
    assert topics["k"] == 3 and sum(t["size"] for t in topics["topics"]) == 10
    assert all(t["size"] >= 1 and 1 <= len(t["words"]) <= 4 for t in topics["topics"])
    for t in topics["topics"]:
        assert sum(t["components"].values()) == t["size"]
    assigned = [json.loads(line) for line in (out / "assignments.jsonl").read_text().splitlines()]
    assert len(assigned) == 10 and {a["topic"] for a in assigned} == {0, 1, 2}
    table = (out / "topics.md").read_text()
    assert "| topic | size | words |" in table and "Wikipedia (en)" in table
    assert (out / "topics.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(out)["stage"] == "topics"


def test_more_topics_than_documents_is_capped(tiny_index, tmp_path):
    assert cli.main(["topics", str(tiny_index), "-k", "50", "-o", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "topics.json").read_text())["k"] == 10


def test_npmi_is_one_for_words_always_together_and_minus_one_for_never():
    from pilelm.retrieval.topic_coherence import lda_topics, npmi_coherence

    docs = [{"cat", "dog"}, {"cat", "dog"}, {"sun", "moon"}, {"sun", "moon", "cat"}]
    together, apart = npmi_coherence([["sun", "moon"], ["dog", "moon"]], docs)
    assert together == pytest.approx(1.0) and apart == -1.0
    # p(cat, dog) = 0.5, p(cat) = 0.75, p(dog) = 0.5: log(0.5 / 0.375) / -log(0.5)
    assert npmi_coherence([["cat", "dog"]], docs)[0] == pytest.approx(math.log(0.5 / 0.375) / math.log(2))
    words = [["cat", "dog", "pet"] * 5, ["sun", "moon", "star"] * 5] * 4
    topics = lda_topics(words, k=2, terms=3)
    assert sorted(map(sorted, topics)) == [["cat", "dog", "pet"], ["moon", "star", "sun"]]
