"""PII scrubbing per type (and what it must leave alone); 13-gram decontamination."""

from __future__ import annotations

import numpy as np
import pytest

from pilelm.data.decontam import DecontamConfig, NgramIndex, build_index, decontaminate
from pilelm.data.pii import PiiConfig, PiiScrubber


@pytest.mark.parametrize(("text", "kind"), [
    ("mail jane.doe+list@mail.example.org now", "email"),
    ("server at 8.8.4.4 is up", "ip_address"),
    ("ipv6 2606:4700:4700::1111 works", "ip_address"),
    ("call (415) 555-0132 or", "phone"),
    ("call +44 20 7946 0958 or", "phone"),
    ("card 4111 1111 1111 1111 ok", "credit_card"),
    ("key AKIAIOSFODNN7EXAMPLE here", "secret"),
    ("token ghp_" + "a1B2" * 9 + " here", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "secret"),
])
def test_pii_is_replaced_by_type(text: str, kind: str) -> None:
    new, counts = PiiScrubber(PiiConfig()).scrub(text)
    assert counts == {kind: 1}
    assert f"<{ {'ip_address': 'IP_ADDRESS', 'phone': 'PHONE_NUMBER', 'credit_card': 'CREDIT_CARD', 'secret': 'SECRET_KEY', 'email': 'EMAIL'}[kind]}>" in new


@pytest.mark.parametrize("text", [
    "localhost is 127.0.0.1 and the router 192.168.1.1",
    "see C++14 section 20.4 and version 3.2.1.0 of the spec",
    "What is 1234567890123 + 4?",
    "int x = 4111111111111112;",  # fails the Luhn check
    "decorator @property and perl @ISA",
    "std::vector<int> a; f::g::h",
    "clause 252.227-7013 applies",
])
def test_pii_leaves_lookalikes_alone(text: str) -> None:
    assert PiiScrubber(PiiConfig()).scrub(text) == (text, {})


def test_pii_types_can_be_chosen() -> None:
    text = "a@b.example.com 8.8.8.8"
    assert PiiScrubber(PiiConfig(types=["email"])).scrub(text) == ("<EMAIL> 8.8.8.8", {"email": 1})
    with pytest.raises(ValueError, match="pii.types"):
        PiiConfig(types=["emails"])


def _words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_index_lookup_matches_set_membership(tmp_path) -> None:
    build_index([_words("w", 500), "too short"], tmp_path, n=13)
    index = NgramIndex(tmp_path)
    assert len(index) == 500 - 12
    rng = np.random.default_rng(0)
    probe = np.concatenate([np.asarray(index.hashes[:100]), rng.integers(0, 2**63, 5000, dtype=np.uint64)])
    assert index.contains(probe).tolist() == np.isin(probe, np.asarray(index.hashes)).tolist()


def test_decontamination_cuts_with_margins_and_drops_shredded_documents(tmp_path) -> None:
    evaluation = "the quick brown fox jumps over the lazy dog near the old river bank today"
    build_index([evaluation], tmp_path, n=13)
    index = NgramIndex(tmp_path)
    cfg = DecontamConfig()
    left, right = "L" * 600, "R" * 600
    # case and punctuation do not hide an overlap
    quoted = "The quick, brown fox jumps over the LAZY dog near the old river bank today"
    clean = _words("x", 300)
    cuts = decontaminate([f"{left} {quoted} {right}", clean], index, cfg)
    assert cuts[1] is None
    cut = cuts[0]
    assert cut is not None and cut.cuts == 1 and cut.text is not None
    assert "quick" not in cut.text.lower()
    a, b = cut.text.split("\n\n")
    assert a == "L" * (600 - 199) and b == "R" * (600 - 199)  # 200 characters (incl. the space) go
    # a short piece left over is dropped; a document cut more than 10 times is dropped whole
    assert decontaminate([f"{'L' * 150} {quoted}"], index, cfg)[0].reason == "decontam_contaminated"
    shredded = f" {'z' * 500} ".join([quoted] * 12)
    assert decontaminate([shredded], index, cfg)[0].reason == "decontam_too_many_pieces"


def test_ngrams_in_many_training_documents_are_ignored(tmp_path) -> None:
    from pilelm.data.decontam import IGNORED, frequent_ngrams, matched_ngrams

    boiler = "permission is hereby granted free of charge to any person obtaining a copy of this software"
    leaked = "the quick brown fox jumps over the lazy dog near the old river bank today"
    build_index([f"{boiler} and {leaked}"], tmp_path, n=13)
    index = NgramIndex(tmp_path)
    train = [f"{_words('a', 40)} {boiler} {_words('b', 40)}" for _ in range(4)] + [f"{leaked} {leaked}"]
    per_doc = matched_ngrams(train, index, 13)
    # each document counts a matched n-gram once, however often it repeats there
    assert per_doc.size == 4 * 4 + 3  # 16 words of boilerplate hold 4 13-grams; 3 of the leaked 15 words
    frequent = frequent_ngrams([per_doc[:8], per_doc[8:]], max_docs=3)
    assert frequent.size == 4 and np.isin(frequent, np.asarray(index.hashes)).all()
    assert frequent_ngrams([per_doc], max_docs=4).size == 0
    np.save(tmp_path / IGNORED, frequent)
    cuts = decontaminate(train, NgramIndex(tmp_path), DecontamConfig())
    assert cuts[:4] == [None] * 4 and cuts[4] is not None
    assert all(c is not None for c in decontaminate(train, NgramIndex(tmp_path, use_ignored=False), DecontamConfig()))
