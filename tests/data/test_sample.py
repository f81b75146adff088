"""The bundled sample corpus: the Pile's layout, its size limits, and clean splits."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

from conftest import read_pile_shard

from pilelm.core.runner import SAMPLE_DIR

SPLITS = ("train", "val", "test")


def _split_files() -> dict[str, list[Path]]:
    return {
        "train": sorted((SAMPLE_DIR / "train").glob("*.jsonl.zst")),
        "val": [SAMPLE_DIR / "val.jsonl.zst"],
        "test": [SAMPLE_DIR / "test.jsonl.zst"],
    }


def test_sample_layout_size_and_splits():
    files = _split_files()
    assert len(files["train"]) >= 2 and all(p.is_file() for ps in files.values() for p in ps)
    on_disk = sum(p.stat().st_size for ps in files.values() for p in ps)
    assert on_disk <= 5e6, f"sample is {on_disk / 1e6:.2f} MB on disk; the limit is 5 MB"

    text_bytes = 0
    components: dict[str, collections.Counter] = {s: collections.Counter() for s in SPLITS}
    owner: dict[str, str] = {}
    for split, paths in files.items():
        for path in paths:
            with open(path, "rb") as f:
                assert f.read(4) == b"\x28\xb5\x2f\xfd", f"{path} is not zstd"
            for rec in read_pile_shard(path):
                assert set(rec) == {"text", "meta"} and isinstance(rec["text"], str) and rec["text"].strip()
                assert isinstance(rec["meta"]["pile_set_name"], str)
                components[split][rec["meta"]["pile_set_name"]] += 1
                text_bytes += len(rec["text"].encode("utf-8"))
                digest = hashlib.sha1(rec["text"].encode()).hexdigest()
                assert owner.setdefault(digest, split) == split, f"a {split} document is also in {owner[digest]}"
    assert 2e6 <= text_bytes <= 10e6, f"sample holds {text_bytes / 1e6:.2f} MB of text; want 2-10 MB"
    assert len(components["train"]) >= 5
    # Every component is measured on test and validated on val.
    assert set(components["test"]) == set(components["train"]) == set(components["val"])


def test_sample_readme_lists_a_licence_per_component():
    readme = (SAMPLE_DIR / "README.md").read_text()
    comps = {rec["meta"]["pile_set_name"] for rec in read_pile_shard(SAMPLE_DIR / "test.jsonl.zst")}
    licence_rows = readme.split("## Sources and licences", 1)[1]
    for comp in comps:
        assert f"| {comp} |" in licence_rows, f"no licence row for {comp}"
    assert "scripts/build_sample.py" in readme
