"""Stage outputs: files take the umask's mode like any other output, and a stage that rewrites
its output removes its old manifest first, so a crash mid-rewrite leaves an unfinished
directory rather than an old manifest over new files."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from pilelm.core.atomic import atomic_write_json
from pilelm.core.manifest import MANIFEST, read_manifest, write_manifest
from pilelm.tokens.mmidx import write_indexed_dataset
from pilelm.tokens.shards import save_docmeta
from pilelm.training import checkpoint


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_take_the_umask_mode(tmp_path, mask):
    with umask(mask):
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")  # what open() gives: the reference
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        write_manifest(tmp_path, "tokenize", {})
        write_indexed_dataset(tmp_path / "train", [[1, 2, 3]], np.uint16)
        save_docmeta(tmp_path / "train.docmeta.npz", np.zeros(1, np.int16), np.ones(1, np.int64))
        checkpoint.save_torch(tmp_path / "state.pt", {"step": torch.tensor(1)})
    want = 0o666 & ~mask
    assert mode(plain) == want
    for name in ("a.json", MANIFEST, "train.idx", "train.bin", "train.docmeta.npz", "state.pt"):
        assert mode(tmp_path / name) == want, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# --- a rewrite never leaves the old manifest over new files -------------------------------------


class Crash(RuntimeError):
    pass


def crash(*args, **kwargs):
    raise Crash("killed mid-rewrite")


def test_eval_rewrite_drops_the_old_manifest_first(tiny_run, tmp_path, monkeypatch):
    from pilelm.evaluation import evaluate

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "the quick", "reference": "brown fox"}\n')
    cfg = evaluate.EvalConfig(runs=[str(tiny_run)], bleu_data=str(pairs), output=str(tmp_path / "eval"),
                              bleu_max_new_tokens=2)
    out = evaluate.run_eval(cfg)
    assert read_manifest(out)["stage"] == "eval"

    def partial_results(out_dir, results, settings):
        (Path(out_dir) / "results.json").write_text("{")  # half written, then the crash
        raise Crash("killed mid-rewrite")

    monkeypatch.setattr(evaluate, "write_results", partial_results)
    with pytest.raises(Crash):
        evaluate.run_eval(cfg)
    assert not (out / MANIFEST).exists()


def test_export_and_import_rewrites_drop_the_old_manifest_first(tiny_run, tmp_path, monkeypatch):
    from pilelm.interop import hf

    export_cfg = hf.ExportConfig(run=str(tiny_run), output=str(tmp_path / "hf"))
    exported = hf.run_export(export_cfg)
    import_cfg = hf.ImportConfig(source=str(exported), output=str(tmp_path / "run"))
    imported = hf.run_import(import_cfg)
    assert read_manifest(exported)["stage"] == "export" and read_manifest(imported)["stage"] == "import"

    monkeypatch.setattr(hf, "save_file", crash)
    with pytest.raises(Crash):
        hf.run_export(export_cfg)
    assert not (exported / MANIFEST).exists()

    monkeypatch.setattr(hf, "save_model", crash)
    with pytest.raises(Crash):
        hf.run_import(import_cfg)
    assert not (imported / MANIFEST).exists()
