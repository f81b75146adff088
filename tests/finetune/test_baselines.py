"""The classical baselines reported beside a fine-tune, on tiny data."""

from __future__ import annotations

from pilelm.finetune.baselines import (
    baseline_table,
    majority_tags,
    rule_punct,
    score_baselines,
    tfidf_logreg,
    unchanged_punct,
)
from pilelm.finetune.metrics import punctuation_metrics
from pilelm.finetune.tasks import TASKS, TaskData


def test_tfidf_logreg_learns_words_of_each_class():
    train = ["the cat sat", "a cat purred", "the dog barked", "a dog ran", "cat and kitten", "dog and puppy"]
    labels = [0, 0, 1, 1, 0, 1]
    assert tfidf_logreg(train, labels, ["my cat slept", "the dog slept", "kitten"]) == [0, 1, 0]


def test_majority_tag_per_word_with_o_for_unseen_words():
    words = [["Paris", "is", "big"], ["Paris", "Hilton", "sang"], ["in", "Paris"]]
    tags = [["B-LOC", "O", "O"], ["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    assert majority_tags(words, tags, [["Paris", "Hilton", "visited", "Rome"]]) == [["B-LOC", "I-PER", "O", "O"]]


def test_punct_rule_and_unchanged_baselines():
    assert unchanged_punct(["a", "b"]) == ["O+lower", "O+lower"]
    assert rule_punct(["the", "cat", "sat"]) == ["O+Cap", "O+lower", "PERIOD+lower"]
    assert rule_punct(["hi"]) == ["PERIOD+Cap"]
    gold = ["O+Cap", "O+lower", "PERIOD+lower", "O+Cap", "QUESTION+lower"]
    rule = punctuation_metrics(gold, rule_punct(["w"] * 5))
    assert rule["per_mark"]["PERIOD"]["precision"] == 0.0  # it put its full stop after the question
    assert punctuation_metrics(gold, unchanged_punct(["w"] * 5))["micro_f1"] == 0.0
    assert punctuation_metrics(gold, rule_punct(["w", "w", "w"]) + rule_punct(["w", "w"]))["micro_f1"] == 0.5


def test_score_baselines_uses_the_split_and_the_table_shows_them():
    data = TaskData(("animal", "fruit"), {}, {"train": [0, 1, 0, 1], "test": [0, 1]},
                    inputs={"train": ["cat dog", "apple pear", "dog cow", "pear plum"], "test": ["cow cat", "plum"]})
    scored = score_baselines(TASKS["classify"], data)
    assert list(scored) == ["TF-IDF + logistic regression"] and set(scored["TF-IDF + logistic regression"]) == {"test"}
    assert scored["TF-IDF + logistic regression"]["test"]["macro_f1"] == 1.0
    results = {"metric": "macro-F1", "test": {"main": 0.5, "per_label": {"animal": {"f1": 0.5}}},
               "baselines": scored}
    table = "\n".join(baseline_table(results))
    assert "| fine-tuned | 0.5000 |" in table and "| TF-IDF + logistic regression | 1.0000 |" in table


def test_punctuate_keeps_the_texts_own_marks_and_capitals():
    from pilelm.finetune.punct import label_text, restore
    from pilelm.finetune.punctuate import keep_existing

    given = label_text("we met in Paris. then it rained")
    predicted = ["O+lower", "O+lower", "O+lower", "O+lower", "COMMA+lower", "O+lower", "PERIOD+lower"]
    merged = keep_existing(given.labels, predicted)
    # The full stop and the capital the text had stay; the model's new marks are added.
    assert restore(given.words, merged) == "we met in Paris. then, it rained."
    assert keep_existing(["QUESTION+Cap"], ["PERIOD+lower"]) == ["QUESTION+Cap"]
