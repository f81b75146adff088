"""The whole road on the shipped tiny pipeline (pilelm/configs/pipelines/tiny.yaml): prepare ->
tokenizer -> tokenize -> train (2 layers, d=64, vocab 512) -> eval -> generate -> report, run
once for the module; each test checks one kind of invariant of what it left behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import read_pile_shard

from pilelm.core.manifest import read_manifest
from pilelm.core.report import write_report
from pilelm.core.runner import PIPELINE_DIR, execute, load_pipeline
from pilelm.tokens.shards import open_split
from pilelm.tokens.tokenizer import load_tokenizer

TINY = PIPELINE_DIR / "tiny.yaml"
STAGES = ["prepare", "tokenizer train", "tokenize", "train", "eval", "generate"]


@pytest.fixture(scope="module")
def road(tmp_path_factory):
    work = tmp_path_factory.mktemp("road")
    pipeline = load_pipeline(TINY, work_dir=work)
    results = execute(pipeline)
    write_report(work, results)  # as `pilelm run` does after the stages
    return work, pipeline, results


def _prepared_docs(prep: Path, split: str) -> list[dict]:
    return [rec for path in sorted((prep / split).glob("*.jsonl.zst")) for rec in read_pile_shard(path)]


def test_every_stage_ran_and_rerun_resumes(road):
    work, pipeline, results = road
    assert [r.name for r in results] == STAGES and all(r.status == "ran" for r in results)
    for stage in pipeline.stages[:-1]:  # generate writes a JSONL file, not a stage directory
        assert read_manifest(stage.output)["stage"] == stage.name.split()[0]
    again = execute(load_pipeline(TINY, work_dir=work))
    assert [r.status for r in again] == ["skipped"] * 5 + ["ran"]


def test_prepare_counts_match_its_files(road):
    work, _, _ = road
    prep = work / "prepared"
    counts = read_manifest(prep)["counts"]
    total_docs = total_bytes = 0
    for split in ("train", "val", "test"):
        docs = _prepared_docs(prep, split)
        assert docs, f"prepared {split} split is empty"
        assert counts["splits"][split]["documents_out"] == len(docs)
        total_docs += len(docs)
        total_bytes += sum(len(d["text"].encode("utf-8")) for d in docs)
        assert all(d["meta"]["pile_set_name"] for d in docs)
    assert counts["documents_out"] == total_docs and counts["bytes_out"] == total_bytes
    dropped = sum(counts["dropped"].values())
    assert counts["documents_in"] == total_docs + dropped


def test_shards_decode_back_to_the_prepared_text(road):
    work, _, _ = road
    shards = work / "shards"
    counts = read_manifest(shards)["counts"]["splits"]
    tok = load_tokenizer(work / "tokenizer")
    assert tok.vocab_size <= 512
    for split in ("train", "val", "test"):
        docs = _prepared_docs(work / "prepared", split)
        ts = open_split(shards, split)
        assert len(ts.dataset) == len(docs) == counts[split]["documents"]
        assert int(ts.dataset.sizes.sum()) == counts[split]["tokens"]
        assert ts.eod_id == tok.eod_id
        for i, doc in enumerate(docs):
            ids = np.asarray(ts.dataset[i])
            assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
            assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) == doc["text"], f"{split} doc {i}"
            assert ts.component_names[ts.component[i]] == doc["meta"]["pile_set_name"]
            assert ts.nbytes[i] == len(doc["text"].encode("utf-8"))


def test_training_logged_every_step_it_claims(road):
    work, pipeline, _ = road
    cfg = next(s.config for s in pipeline.stages if s.name == "train")
    run = work / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(steps) and steps[-1] == cfg.loop.max_steps
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert read_manifest(run)["counts"]["steps"] == cfg.loop.max_steps
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file() and (ckpts[-1] / "model.safetensors").is_file()
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (work / "tokenizer" / "tokenizer.json").read_bytes()


def test_bpb_is_finite_and_beats_the_unigram_baseline(road):
    work, pipeline, _ = road
    results = json.loads((work / "eval" / "results.json").read_text())
    (model,) = results["runs"].values()
    unigram = results["baselines"]["unigram"]
    cfg = next(s.config for s in pipeline.stages if s.name == "eval")
    test = open_split(work / "shards", "test")
    n = cfg.max_documents or len(test.dataset)
    assert model["overall"]["bytes"] == int(test.nbytes[:n].sum())
    # Every token of every scored document counts once (the EOD is context, never a target).
    assert model["overall"]["tokens"] == int(test.dataset.sizes[:n].sum()) - n
    assert set(model["components"]) == {test.component_names[c] for c in set(test.component[:n].tolist())}
    assert len(model["components"]) >= 5
    bpb, base = model["overall"]["bpb"], unigram["overall"]["bpb"]
    assert math.isfinite(bpb) and 0 < bpb < base, (bpb, base)
    for name, comp in model["components"].items():
        assert math.isfinite(comp["bpb"]) and comp["bpb"] > 0, name


def test_generate_and_report(road):
    work, pipeline, _ = road
    gen = next(s.config for s in pipeline.stages if s.name == "generate")
    samples = [json.loads(line) for line in (work / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [p for p in gen.prompt for _ in range(gen.num_samples)]
    assert all(isinstance(s["completion"], str) and s["completion"] for s in samples)
    report = (work / "report.md").read_text()
    results = json.loads((work / "eval" / "results.json").read_text())
    (model,) = results["runs"].values()
    assert f"{model['overall']['bpb']:.3f}" in report and "unigram" in report
    assert (work / "loss.png").read_bytes()[:4] == b"\x89PNG"
