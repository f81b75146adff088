"""``pilelm prepare`` end to end: layout, manifest, meta, rejects, report; resume after
kill -9 gives the same bytes; the Ray executor gives the same output as the local one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, read_pile_shard, write_pile_shard

from pilelm.core.config import load_config
from pilelm.core.manifest import read_manifest
from pilelm.data.pipeline import PrepareConfig, run_prepare
from pilelm.data.stats import read_rejects

COMMON = ("the of and to in that is was for with as on by at from have be this which it are "
          "or an were but not all they their has been one more when there can said also").split()


def _prose(rng: random.Random, vocab: list[str], sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = [rng.choice(COMMON if rng.random() < 0.45 else vocab) for _ in range(rng.randint(8, 16))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


def _code(rng: random.Random, i: int) -> str:
    body = "\n".join(f"    x{k} = compute(x{k - 1}, {rng.randint(0, 99)});" for k in range(1, rng.randint(8, 20)))
    return f"/* module {i} */\n#include <stdio.h>\n\nint f{i}(int x0) {{\n{body}\n    return x0;\n}}\n\n}}\n}}\n"


def _maths(rng: random.Random) -> str:
    qs = []
    for _ in range(6):
        a, b = rng.randint(-99, 99), rng.randint(-99, 99)
        qs.append(f"What is {a} + {b}?\n{a + b}")
    return "\n".join(qs) + "\n"


def build_corpus(root: Path, n_files: int = 6, docs_per_file: int = 24, seed: int = 0) -> dict:
    """A small raw corpus in the Pile layout with planted cases; returns what was planted."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(800)]
    val_docs = [{"text": _prose(rng, vocab, 12), "meta": {"pile_set_name": "Pile-CC"}} for _ in range(4)]
    write_pile_shard(root / "val.jsonl.zst", val_docs)
    planted = {"val": val_docs}
    all_train = []
    for f in range(n_files):
        docs = []
        for k in range(docs_per_file):
            kind = k % 4
            if kind == 0:
                docs.append({"text": _code(rng, f * 100 + k), "meta": {"pile_set_name": "Github", "repo": f"r{k}"}})
            elif kind == 1:
                docs.append({"text": _maths(rng), "meta": {"pile_set_name": "DM Mathematics"}})
            else:
                docs.append({"text": _prose(rng, vocab, rng.randint(8, 14)), "meta": {"pile_set_name": "Pile-CC", "url": f"u{f}.{k}"}})
        all_train.append(docs)
    first = all_train[0]
    # planted: an exact duplicate (other case/punctuation), a near duplicate, PII, contamination
    first[2]["text"] = first[2]["text"].replace(".", "!") + "\nWrite to jane.doe@example.com or call 415-555-0132 today."
    all_train[1][2] = {"text": first[2]["text"].upper(), "meta": {"pile_set_name": "Pile-CC"}}
    near = first[3]["text"].split(" ")
    near[5] = "changed"
    all_train[2][3] = {"text": " ".join(near), "meta": {"pile_set_name": "Pile-CC"}}
    all_train[3][6] = {"text": _prose(rng, vocab, 10) + "\n" + val_docs[0]["text"].split("\n")[3] + "\n" + _prose(rng, vocab, 10),
                       "meta": {"pile_set_name": "Pile-CC"}}
    all_train[4][7] = {"text": "buy now " * 200, "meta": {"pile_set_name": "Pile-CC"}}
    for f, docs in enumerate(all_train):
        write_pile_shard(root / "train" / f"{f:02d}.jsonl.zst", docs)
    # a plain JSON-lines file, big enough to be split into byte ranges, with bad records
    lines = [json.dumps({"text": _prose(rng, vocab, 12), "meta": {"pile_set_name": "Wikipedia (en)"}}) for _ in range(60)]
    lines[10] = '{"text": "broken'
    lines[20] = json.dumps({"meta": {"pile_set_name": "Wikipedia (en)"}})
    (root / "train" / "wiki.jsonl").write_text("\n".join(lines) + "\n")
    planted.update(exact=first[2]["text"], contaminated=all_train[3][6]["text"], files=n_files)
    return planted


def _cfg(raw: Path, out: Path, **over) -> PrepareConfig:
    base = {"inputs": [str(raw)], "output": str(out), "executor": {"workers": 1, "group_bytes": 0, "task_bytes": 65536}}
    for k, v in over.items():
        base[k] = v
    return load_config(PrepareConfig, overrides=base)


def _data_files(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("*/*.jsonl.zst")) + [out / "rejects.jsonl.zst", out / "stats.md"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _docs(out: Path, split: str) -> list[dict]:
    return [r for p in sorted((out / split).glob("*.jsonl.zst")) for r in read_pile_shard(p)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("prep")
    raw = root / "raw"
    planted = build_corpus(raw)
    out = run_prepare(_cfg(raw, root / "out"))
    return raw, out, planted


def test_layout_manifest_and_counts(prepared: tuple[Path, Path, dict]) -> None:
    raw, out, planted = prepared
    m = read_manifest(out)
    assert m["stage"] == "prepare"
    c = m["counts"]
    assert c["documents_in"] == c["documents_out"] + sum(c["dropped"].values())
    for name, comp in c["components"].items():
        assert comp["documents_in"] == comp["documents_out"] + sum(comp["dropped"].values()), name
    assert set(c["splits"]) == {"train", "val"}
    train = _docs(out, "train")
    assert len(train) == c["splits"]["train"]["documents_out"]
    assert sorted(p.name for p in (out / "train").glob("*.jsonl.zst")) == m["extra"]["shards"]["train"]
    assert not (out / ".work").exists()
    # code and generated maths are not destroyed by the prose rules
    comps = c["components"]
    assert comps["Github"]["documents_out"] == comps["Github"]["documents_in"] > 0
    assert comps["DM Mathematics"]["documents_out"] == comps["DM Mathematics"]["documents_in"] > 0
    assert any(r["meta"].get("repo") == "r0" for r in train)  # original meta kept


def test_duplicates_pii_decontamination_and_rejects(prepared: tuple[Path, Path, dict]) -> None:
    raw, out, planted = prepared
    dropped = read_manifest(out)["counts"]["dropped"]
    assert dropped["exact_duplicate"] == 1 and dropped["near_duplicate"] == 1
    assert dropped["invalid_json"] == 1 and dropped["missing_text"] == 1
    assert any(r.startswith("gopher_") for r in dropped)
    rejects = read_rejects(out / "rejects.jsonl.zst")
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["invalid_json"]["source"] == "raw/train/wiki.jsonl:11"
    assert by_reason["exact_duplicate"]["source"] == "raw/train/01.jsonl.zst:3"
    assert by_reason["exact_duplicate"]["detail"] == "duplicate of raw/train/00.jsonl.zst:3"
    assert len(rejects) == sum(dropped.values())
    train = _docs(out, "train")
    scrubbed = [r for r in train if "<EMAIL>" in r["text"]]
    assert len(scrubbed) == 1 and "<PHONE_NUMBER>" in scrubbed[0]["text"]
    assert scrubbed[0]["meta"]["pilelm"]["pii"] == {"email": 1, "phone": 1}
    assert "jane.doe" not in "".join(r["text"] for r in train)
    assert all("pilelm" not in r["meta"] for r in train if r["meta"]["pile_set_name"] == "Github")
    # the train document that quoted a val line: that part is cut out (or the document dropped)
    val_line = planted["val"][0]["text"].split("\n")[3]
    assert all(val_line not in r["text"] for r in train)
    cut = [r for r in train if r["meta"].get("pilelm", {}).get("decontam_cut")]
    assert cut or dropped.get("decontam_contaminated")
    val = _docs(out, "val")
    assert [r["text"] for r in val] == [d["text"] for d in planted["val"]]  # eval text is not cut


def test_report_and_rerun(prepared: tuple[Path, Path, dict]) -> None:
    raw, out, planted = prepared
    report = (out / "stats.md").read_text()
    for name in ("Github", "DM Mathematics", "Pile-CC", "Wikipedia (en)", "exact_duplicate"):
        assert name in report
    for png in ("lengths.png", "removed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = _data_files(out)
    assert run_prepare(_cfg(raw, out)) == out  # same inputs and config: nothing to do
    assert _data_files(out) == before
    with pytest.raises(ValueError, match="other settings"):
        run_prepare(_cfg(raw, out, filters={"min_chars": 10}))


def test_byte_range_split_gives_the_same_documents(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    raw, out, _ = prepared
    whole = run_prepare(_cfg(raw, tmp_path / "whole", executor={"workers": 1, "task_bytes": 1 << 30}))
    assert len(list((whole / "train").glob("*.jsonl.zst"))) < len(list((out / "train").glob("*.jsonl.zst")))
    assert _docs(whole, "train") == _docs(out, "train")
    def key(r: dict) -> tuple:
        return r["source"], r["reason"]

    assert sorted(read_rejects(whole / "rejects.jsonl.zst"), key=key) == sorted(read_rejects(out / "rejects.jsonl.zst"), key=key)


@pytest.mark.dist
def test_kill_9_and_resume_gives_identical_output(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    raw, reference, _ = prepared
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pilelm", "prepare", str(raw), "-o", str(out), "executor.workers=2",
           "executor.group_bytes=0", "executor.task_bytes=65536"]
    proc = subprocess.Popen(cmd, cwd=raw.parent, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not list((out / ".work" / "clean").glob("*.done.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # it really was killed part-way
    finished = len(list((out / ".work" / "clean").glob("*.done.json")))
    assert 0 < finished < len(json.loads((out / ".work" / "plan.json").read_text())["tasks"])
    run_prepare(_cfg(raw, out, executor={"workers": 2, "group_bytes": 0, "task_bytes": 65536}))
    assert _data_files(out) == _data_files(reference)
    assert read_manifest(out)["counts"] == read_manifest(reference)["counts"]


@pytest.mark.dist
def test_ray_executor_matches_local(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    raw, reference, _ = prepared
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_prepare(_cfg(raw, tmp_path / "ray", executor={"kind": "ray", "group_bytes": 0, "task_bytes": 65536}))
    finally:
        ray.shutdown()
    assert _data_files(out) == _data_files(reference)


def test_cli_help_and_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_text = subprocess.run([sys.executable, "-m", "pilelm", "prepare", "--help"], capture_output=True,
                               text=True, env=env, check=True).stdout
    for key in ("filters.min_words", "dedup.bands", "decontam.margin_chars", "executor.kind", "reader.text_field"):
        assert key in help_text
    r = subprocess.run([sys.executable, "-m", "pilelm", "prepare", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_extra_eval_files_decontaminate_train(tmp_path: Path) -> None:
    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(300)]
    quote = _prose(rng, vocab, 3)
    docs = [{"text": _prose(rng, vocab, 12), "meta": {"pile_set_name": "Pile-CC"}} for _ in range(5)]
    docs[2]["text"] = _prose(rng, vocab, 8) + "\n" + quote + "\n" + _prose(rng, vocab, 8)
    write_pile_shard(tmp_path / "raw" / "00.jsonl.zst", docs)
    (tmp_path / "bench.jsonl").write_text(json.dumps({"text": quote}) + "\n")
    out = run_prepare(_cfg(tmp_path / "raw", tmp_path / "out", decontam={"eval_files": [str(tmp_path / "bench.jsonl")]}))
    m = read_manifest(out)
    assert m["extra"]["decontam_index_ngrams"] > 0
    texts = [r["text"] for r in _docs(out, "train")]
    assert all(quote.split("\n")[1] not in t for t in texts)
    assert m["counts"]["decontam_cuts"] >= 1


def test_boilerplate_in_many_training_documents_is_not_decontaminated(tmp_path: Path) -> None:
    """GPT-3's rule: an evaluation n-gram found in more than decontam.max_train_docs training
    documents (licence text here) is ignored; a quote found in one is still cut."""
    rng = random.Random(7)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(300)]
    licence = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
               "software and associated documentation files, to deal in the software without restriction.")
    val = [{"text": licence + "\n" + _prose(rng, vocab, 12), "meta": {"pile_set_name": "Github"}} for _ in range(2)]
    quote = "\n".join(val[0]["text"].split("\n")[3:6])
    train = [{"text": licence + "\n" + _prose(rng, vocab, 12), "meta": {"pile_set_name": "Github"}} for _ in range(12)]
    train.append({"text": _prose(rng, vocab, 8) + "\n" + quote + "\n" + _prose(rng, vocab, 8),
                  "meta": {"pile_set_name": "Github"}})
    write_pile_shard(tmp_path / "raw" / "train" / "00.jsonl.zst", train)
    write_pile_shard(tmp_path / "raw" / "val.jsonl.zst", val)

    out = run_prepare(_cfg(tmp_path / "raw", tmp_path / "out"))
    texts = [r["text"] for r in _docs(out, "train")]
    assert sum(licence in t for t in texts) == 12  # the licence stays
    assert len(texts) == 13 and all(quote not in t for t in texts)
    m = read_manifest(out)
    assert m["extra"]["decontam_ignored_ngrams"] > 0 and m["counts"]["decontam_cuts"] == 1

    strict = run_prepare(_cfg(tmp_path / "raw", tmp_path / "strict", decontam={"max_train_docs": 0}))
    assert not any(licence in r["text"] for r in _docs(strict, "train"))
    assert read_manifest(strict)["extra"]["decontam_ignored_ngrams"] == 0
