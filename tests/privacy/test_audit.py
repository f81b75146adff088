"""Canaries and the memorization audit: planting (exact counts, kill-safe), exposure arithmetic,
and `pilelm prepare privacy.canaries` -> tokenize -> train -> `pilelm audit` end to end, where a
canary repeated 100 times is memorized by a model trained without DP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pilelm.core.config import load_config
from pilelm.data.canary_config import CanaryConfig
from pilelm.data.pipeline import PrepareConfig, run_prepare
from pilelm.data.prepared import read_split
from pilelm.privacy.canaries import load_canaries, make_canaries, plant_canaries
from pilelm.privacy.exposure import extrapolated_exposure, rank_exposure
from tests.conftest import write_pile_shard

WORDS = ("river stone cloud maple harbor lantern meadow copper violet thunder orchard velvet "
         "signal candle prairie marble falcon ember willow granite").split()


def corpus(root: Path, n_train: int = 150, seed: int = 0) -> list[str]:
    """Raw Pile-format inputs: distinct multi-line word documents, a val and a test file."""
    rng = np.random.default_rng(seed)

    def doc(i: int) -> dict:
        lines = [" ".join(rng.choice(WORDS, 8)) + f" {i}." for _ in range(3)]
        return {"text": "\n".join(lines), "meta": {"pile_set_name": "Pile-CC"}}

    write_pile_shard(root / "train" / "00.jsonl.zst", [doc(i) for i in range(n_train)])
    write_pile_shard(root / "val.jsonl.zst", [doc(10_000 + i) for i in range(10)])
    write_pile_shard(root / "test.jsonl.zst", [doc(20_000 + i) for i in range(10)])
    return [str(root / "train"), str(root / "val.jsonl.zst"), str(root / "test.jsonl.zst")]


def prepare(inputs: list[str], out: Path, **privacy) -> Path:
    cfg = load_config(PrepareConfig, overrides={
        "inputs": inputs, "output": str(out), "executor": {"workers": 1},
        "filters": {"gopher_quality": [], "gopher_repetition": [], "c4": []},
        "decontam": {"enabled": False}, "privacy": privacy})
    return run_prepare(cfg)


def test_make_canaries_groups_and_references():
    cs = make_canaries(CanaryConfig(canaries=3, repetitions=[1, 10], seed=5))
    assert [c.repetitions for c in cs.canaries] == [1, 1, 1, 10, 10, 10, 0, 0, 0]
    assert len({c.key for c in cs.canaries}) == 9
    for c in cs.canaries:
        assert len(c.secret) == 8 and c.secret.isdigit()
        assert c.text == f"the account number of customer {c.key} is {c.secret}" and c.text.startswith(c.prefix)
    assert make_canaries(CanaryConfig(canaries=3, repetitions=[1, 10], seed=5)) == cs  # seeded
    more = make_canaries(CanaryConfig(canaries=3, repetitions=[1, 10], seed=5, references=7))
    assert [c.repetitions for c in more.canaries] == [1, 1, 1, 10, 10, 10, *[0] * 7]
    assert len({c.key for c in more.canaries}) == 13
    with pytest.raises(ValueError, match="privacy.references"):
        CanaryConfig(canaries=3, references=-1)


def test_planting_counts_are_exact_and_survive_a_kill(tmp_path):
    prep = prepare(corpus(tmp_path / "raw"), tmp_path / "prep", canaries=2, repetitions=[1, 5, 30])
    cs = load_canaries(prep / "canaries.json")
    texts = [d.text for d in read_split(prep, "train")]
    assert len(texts) == 150
    for c in cs.canaries:
        holding = [t for t in texts if c.text in t]
        assert len(holding) == c.repetitions  # distinct documents, one copy each
        assert all(c.text in t.split("\n") for t in holding)  # a line of its own
    manifest = json.loads((prep / "manifest.json").read_text())
    assert manifest["extra"]["canaries"]["copies"] == 2 * (1 + 5 + 30)
    assert manifest["config"]["privacy"]["canaries"] == 2

    # A run killed after staging but before moving every file: the rerun plants once.
    clean = prepare(corpus(tmp_path / "raw"), tmp_path / "clean")
    work = tmp_path / "work"
    cfg = CanaryConfig(canaries=2, repetitions=[1, 5, 30])
    plant_canaries(cfg, clean, work)
    once = [d.text for d in read_split(clean, "train")]
    plant_canaries(cfg, clean, work)  # the staged record is done: nothing is planted twice
    assert [d.text for d in read_split(clean, "train")] == once == texts


def test_exposure_arithmetic():
    candidates = np.arange(1.0, 1001.0)  # NLLs 1 .. 1000
    top, rank = rank_exposure(0.5, candidates)
    assert rank == 1 and top == pytest.approx(math.log2(1001))
    middle, rank = rank_exposure(500.5, candidates)
    assert rank == 501 and middle == pytest.approx(math.log2(1001) - math.log2(501))
    rng = np.random.default_rng(0)
    sample = rng.normal(50.0, 2.0, 2000)
    assert extrapolated_exposure(50.0, sample, 26.6) == pytest.approx(1.0, abs=0.15)  # the median: 1 bit
    assert extrapolated_exposure(50.0 - 2.0 * 4.0, sample, 26.6) > 12  # 4 sigma below: rarer than 1 in 2^12
    assert extrapolated_exposure(-1e9, sample, 26.6) == 26.6  # capped at the size of the space


def test_summary_gives_each_group_its_mean_and_spread():
    from pilelm.privacy.audit import results_table, summarise

    rows = [{"repetitions": reps, "exposure": e, "exposure_rank": e / 2, "extracted": e > 20}
            for reps, e in [(0, 1.0), (0, 3.0), (10, 12.0), (10, 16.0), (10, 20.0), (100, 26.6)]]
    groups = {g["repetitions"]: g for g in summarise(rows)}
    assert groups[0]["exposure"] == 2.0 and groups[0]["exposure_sd"] == pytest.approx(math.sqrt(2))
    assert groups[10]["exposure"] == 16.0 and groups[10]["exposure_sd"] == pytest.approx(4.0)
    assert groups[100]["exposure_sd"] == 0.0 and groups[100]["extracted"] == 1 and groups[10]["canaries"] == 3
    table = results_table({"groups": list(groups.values()), "pii": {"tried": 0, "completed": 0}})
    assert "| 10 | 3 | 16.00 ± 4.00 | 8.00 | 0/3 |" in table


@pytest.mark.slow
def test_audit_finds_a_canary_trained_100_times(tmp_path):
    # The whole road in one pipeline: prepare with canaries -> tokenizer -> tokenize -> train -> audit.
    inputs = corpus(tmp_path / "raw", n_train=120)
    pipeline = {"work_dir": str(tmp_path / "work"), "stages": [
        {"stage": "prepare", "inputs": inputs, "executor": {"workers": 1}, "decontam": {"enabled": False},
         "filters": {"gopher_quality": [], "gopher_repetition": [], "c4": []},
         "privacy": {"canaries": 2, "repetitions": [1, 100]}},
        {"stage": "tokenizer train", "data": "prepared", "kind": "bpe", "vocab_size": 320},
        {"stage": "tokenize", "data": "prepared", "tokenizer": "tokenizer"},
        {"stage": "train", "config": "tiny", "data": "shards", "model": {"block_size": 64},
         "loop": {"max_steps": 150, "micro_batch": 8, "eval_every": 0, "num_threads": 1, "tensorboard": False,
                  "precision": "fp32", "peak_flops": 1e12}},
        {"stage": "audit", "run": "run", "canaries": "prepared/canaries.json", "candidates": 200,
         "pii_originals": 0},
    ]}
    (tmp_path / "pipeline.yaml").write_text(json.dumps(pipeline))
    subprocess.run([sys.executable, "-m", "pilelm", "run", str(tmp_path / "pipeline.yaml")], check=True,
                   capture_output=True)
    audit = tmp_path / "work" / "audit"
    results = json.loads((audit / "results.json").read_text())
    groups = {g["repetitions"]: g for g in results["groups"]}
    assert set(groups) == {0, 1, 100} and all(g["canaries"] == 2 for g in groups.values())
    # Trained 100 times without DP: at the top of 200 random look-alikes, far above chance.
    assert groups[100]["exposure_rank"] > math.log2(201) - 1
    assert groups[100]["exposure"] > groups[0]["exposure"] + 5
    assert groups[0]["exposure_rank"] < 5
    assert (audit / "results.md").read_text().startswith("| canary repetitions")
    manifest = json.loads((audit / "manifest.json").read_text())
    assert manifest["stage"] == "audit" and manifest["counts"]["canaries"] == 6
    assert "## Memorization audit" in (tmp_path / "work" / "report.md").read_text()


def test_audit_errors_name_the_fix(tmp_path, tiny_run):
    from pilelm.privacy.audit import AuditConfig, run_audit

    with pytest.raises(FileNotFoundError, match="privacy.canaries=N"):
        run_audit(AuditConfig(run=tiny_run, canaries=tmp_path / "none.json", output=tmp_path / "a"))
    with pytest.raises(ValueError, match="canaries"):
        run_audit(AuditConfig(run=tiny_run, output=tmp_path / "a"))


def test_the_audit_results_never_hold_the_scrubbed_pii(tmp_path, tiny_run):
    """results.json names each scrubbed original only masked, in the prompt and the completion too."""
    from pilelm.core.config import to_dict
    from pilelm.core.manifest import write_manifest
    from pilelm.data.pii import PiiConfig, PiiScrubber
    from pilelm.privacy.audit import AuditConfig, masked, redacted_rows, run_audit

    emails = [f"jane.doe{i}@example.org" for i in range(3)]
    docs = [{"text": f"the quick brown fox wrote to {e} and then to bob{i}@example.net today",
             "meta": {"pile_set_name": "Pile-CC"}} for i, e in enumerate(emails)]
    write_pile_shard(tmp_path / "raw" / "train" / "00.jsonl.zst", docs)
    prepared = tmp_path / "prepared"
    write_manifest(prepared, "prepare", to_dict(PrepareConfig(inputs=[str(tmp_path / "raw" / "train")])))
    (prepared / "canaries.json").write_text(json.dumps(make_canaries(CanaryConfig(canaries=1, repetitions=[1])).to_json()))
    out = run_audit(AuditConfig(run=tiny_run, canaries=prepared / "canaries.json", output=tmp_path / "audit",
                                candidates=4, pii_originals=10))
    text = (out / "results.json").read_text()
    items = json.loads(text)["pii"]["items"]
    assert {masked(e) for e in emails} <= {i["original"] for i in items}
    assert all(i["kind"] == "email" and set(i["original"][1:-1]) == {"*"} for i in items)
    assert not any(e in text for e in emails) and "@example.net" not in text  # prompts hold PII too
    # A completion that reproduced the original: counted, and masked in the file.
    scrubber = PiiScrubber(PiiConfig())
    row = {"kind": "email", "prefix": "mail bob@example.net or ", "original": emails[0],
           "completion": f"{emails[0]} soon", "completed": True}
    (kept,) = redacted_rows([row], scrubber)
    assert kept["completed"] and kept["completion"] == f"{masked(emails[0])} soon"
    assert kept["prefix"] == f"mail {masked('bob@example.net')} or " and kept["original"] == "j" + "*" * 19 + "g"
