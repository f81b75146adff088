"""A stage that writes a new model into a used output directory (`quantize`, `prune`, `import`,
`distill`) discards the run that was there first: no older checkpoint of another model may
outrank the new one, nor stale files stay in its tokenizer (issue 29, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pilelm.compress.distill import run_distill
from pilelm.compress.prune import PruneConfig, run_prune
from pilelm.compress.quantize import QuantizeConfig, run_quantize
from pilelm.core.manifest import read_manifest
from pilelm.training import checkpoint
from tests.compress.test_distill import _config

OLD_STEP = 5000  # newer than any checkpoint the stages below write


def _used_output(tiny_run: Path, where: Path) -> Path:
    """A finished run of another model, its checkpoint at step 5000, its tokenizer with a file
    of its own, its metrics and config."""
    shutil.copytree(tiny_run, where)
    checkpoint.latest_checkpoint(where).rename(checkpoint.checkpoint_dir(where, OLD_STEP))
    (where / "tokenizer" / "special_tokens_map.json").write_text('{"old": true}')
    (where / "metrics.jsonl").write_text(json.dumps({"step": OLD_STEP, "loss": 1.0}) + "\n")
    (where / "config.yaml").write_text("old: true\n")
    return where


def _assert_only_the_new_run(out: Path, stage: str, step: int, tokenizer: Path) -> None:
    assert read_manifest(out)["stage"] == stage
    assert [s for s, _ in checkpoint.list_checkpoints(out)][-1:] == [step]
    assert OLD_STEP not in [s for s, _ in checkpoint.list_checkpoints(out)]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(p.name for p in tokenizer.iterdir())
    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert OLD_STEP not in [json.loads(row)["step"] for row in rows]
    assert checkpoint.resolve_checkpoint(out)[0] == step  # what eval, generate and serve load


def test_quantize_and_prune_into_a_used_output(tiny_run, tmp_path):
    source_step = checkpoint.resolve_checkpoint(tiny_run)[0]
    out = _used_output(tiny_run, tmp_path / "used")
    run_quantize(QuantizeConfig(run=str(tiny_run), output=str(out), method="int8-weight"))
    _assert_only_the_new_run(out, "quantize", source_step, tiny_run / "tokenizer")
    assert not (out / "config.yaml").exists()
    assert checkpoint.stored_weight_formats(checkpoint.latest_checkpoint(out))  # the quantized model
    # Over a quantized output, a pruned model: the quantized checkpoint goes.
    checkpoint.latest_checkpoint(out).rename(checkpoint.checkpoint_dir(out, OLD_STEP))
    run_prune(PruneConfig(run=str(tiny_run), output=str(out), method="magnitude", sparsity=0.3))
    _assert_only_the_new_run(out, "prune", source_step, tiny_run / "tokenizer")
    assert not checkpoint.stored_weight_formats(checkpoint.latest_checkpoint(out))


def test_a_stage_never_writes_over_its_own_source(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(ValueError, match="give another -o"):
        run_quantize(QuantizeConfig(run=str(run), output=str(run), method="int8-weight"))
    assert checkpoint.list_checkpoints(run) and (run / "manifest.json").is_file()


def test_import_into_a_used_output(tiny_run, tmp_path):
    from pilelm.interop.hf import ExportConfig, ImportConfig, run_export, run_import

    hf_dir = run_export(ExportConfig(run=str(tiny_run), output=str(tmp_path / "hf")))
    out = _used_output(tiny_run, tmp_path / "used")
    run_import(ImportConfig(source=str(hf_dir), output=str(out)))
    assert read_manifest(out)["stage"] == "import"
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [0]
    assert not (out / "tokenizer" / "special_tokens_map.json").exists() or \
        "old" not in (out / "tokenizer" / "special_tokens_map.json").read_text()
    assert "old" not in (out / "config.yaml").read_text()


def test_distill_into_a_used_output(tiny_run, tiny_shards, tmp_path):
    """distill (the trainer's fresh start, as `train`): a checkpoint it cannot resume from (here
    another model's, without training state) is discarded, not left to outrank its own."""
    out = _used_output(tiny_run, tmp_path / "used")
    run_distill(_config(tiny_run, tiny_shards, out))
    _assert_only_the_new_run(out, "distill", 6, tiny_shards / "tokenizer")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
