"""`pilelm compress report`: one table of a base run and its compressed runs."""

from __future__ import annotations

import json

from conftest import TINY_TEXTS, write_pile_shard

from pilelm.compress.prune import PruneConfig, run_prune
from pilelm.compress.quantize import QuantizeConfig, run_quantize
from pilelm.core import cli
from pilelm.core.manifest import write_manifest


def test_compress_report_table(tiny_run, tmp_path):
    prep = tmp_path / "prep"
    docs = [{"text": t, "meta": {"pile_set_name": "Github" if i % 2 else "Pile-CC"}} for i, t in enumerate(TINY_TEXTS)]
    write_pile_shard(prep / "test" / "00.jsonl.zst", docs)
    write_manifest(prep, "prepare", {})
    q = run_quantize(QuantizeConfig(run=str(tiny_run), output=str(tmp_path / "int8"), group_size=32))
    p = run_prune(PruneConfig(run=str(tiny_run), output=str(tmp_path / "pruned"), heads=0.5, channels=0.5))
    out = tmp_path / "report"
    assert cli.main(["compress report", str(tiny_run), str(q), str(p), "--data", str(prep), "-o", str(out),
                     "--new-tokens", "4", "--repeats", "1"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    base, int8, pruned = rows
    assert [r["made_by"] for r in rows] == ["train", "quantize int8-weight", "prune heads 0.5 channels 0.5"]
    assert int8["parameters"] == base["parameters"] > pruned["parameters"]
    assert int8["bytes"] < base["bytes"] / 2 and pruned["bytes"] < base["bytes"]
    assert int8["quantized_layers"] == 9 and base["quantized_layers"] == 0
    # int8 weights barely move BPB on the texts the model was fitted to; every run has both components.
    assert abs(int8["bpb"] - base["bpb"]) < 0.05 * base["bpb"]
    assert all(set(r["components"]) == {"Github", "Pile-CC"} for r in rows)
    assert all(r["tok_s"]["1"] > 0 and r["tok_s"]["8"] > 0 for r in rows)
    table = (out / "report.md").read_text()
    assert "| int8 | quantize int8-weight |" in table and "1.00x" in table
