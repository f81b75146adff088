"""The shard dir (``pilelm tokenize`` output): its layout, written and read here only.

    SHARDS/<split>.bin, <split>.idx    the tokens, MMIDIDX (``pilelm.tokens.mmidx``): one
                                       sequence per document, each followed by one EOD
    SHARDS/<split>.docmeta.npz         ``component`` (int16 code) and ``nbytes`` (int64 UTF-8
                                       bytes of the text) per document
    SHARDS/<split>.components.json     the component names, index = code
    SHARDS/tokenizer/                  the tokenizer the ids belong to
    SHARDS/manifest.json               ``extra.tokenizer``: eod_id, vocab_size, fingerprint ...

``open_split`` opens one split with everything a trainer or evaluator needs; a split is part
of a shard dir only when the manifest lists it (``counts.splits``), so a stray ``val.bin``
left by another run or copied in is never read. ``remove_split`` deletes a split's files (a
rewrite that writes fewer splits removes the others).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_path, atomic_write_json
from pilelm.core.manifest import require_stage
from pilelm.tokens.mmidx import IndexedDataset

TOKENIZER_DIR = "tokenizer"


def split_prefix(shard_dir: str | Path, split: str) -> Path:
    """The MMIDIDX prefix of a split (``SHARDS/<split>``)."""
    return Path(shard_dir) / split


def has_split(shard_dir: str | Path, split: str) -> bool:
    return split_prefix(shard_dir, split).with_suffix(".idx").is_file()


def listed_splits(shard_dir: str | Path) -> list[str]:
    """The splits a finished shard dir holds: those its manifest lists."""
    manifest = require_stage(shard_dir, "tokenize", what="token shard")
    return sorted(manifest.get("counts", {}).get("splits", {}))


def split_paths(shard_dir: str | Path, split: str) -> list[Path]:
    """Every file of one split (tokens, index, sidecars)."""
    prefix = split_prefix(shard_dir, split)
    return [prefix.with_suffix(".bin"), prefix.with_suffix(".idx"), _docmeta_path(shard_dir, split),
            _components_path(shard_dir, split)]


def remove_split(shard_dir: str | Path, split: str) -> None:
    for path in split_paths(shard_dir, split):
        path.unlink(missing_ok=True)


def _docmeta_path(shard_dir: str | Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}.docmeta.npz"


def _components_path(shard_dir: str | Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}.components.json"


@dataclass
class TokenSplit:
    """One split of a shard dir: the tokens and what each document is."""

    dataset: IndexedDataset
    component: np.ndarray
    """int16 component code per document (index into ``component_names``)."""
    component_names: list[str]
    nbytes: np.ndarray
    """int64 UTF-8 bytes of each document's text (for bits per byte)."""
    tokenizer_dir: Path
    eod_id: int
    vocab_size: int

    def __len__(self) -> int:
        return len(self.dataset)


def open_split(shard_dir: str | Path, split: str) -> TokenSplit:
    """Open ``shard_dir/<split>.bin/.idx`` with its per-document sidecars."""
    shard_dir = Path(shard_dir)
    manifest = require_stage(shard_dir, "tokenize", what="token shard")
    prefix = split_prefix(shard_dir, split)
    have = sorted(manifest.get("counts", {}).get("splits", {}))
    if split not in have or not has_split(shard_dir, split):
        raise FileNotFoundError(f"{shard_dir} has no split {split!r} (splits: {', '.join(have) or 'none'})")
    ds = IndexedDataset(prefix)
    meta_path = _docmeta_path(shard_dir, split)
    with np.load(meta_path) as meta:
        component = np.asarray(meta["component"])
        nbytes = np.asarray(meta["nbytes"])
    if len(component) != len(ds) or len(nbytes) != len(ds):
        raise ValueError(f"{meta_path}: {len(component)} documents, but {prefix}.idx has {len(ds)}")
    names = json.loads(_components_path(shard_dir, split).read_text())
    tok = manifest.get("extra", {}).get("tokenizer", {})
    return TokenSplit(ds, component, list(names), nbytes, shard_dir / TOKENIZER_DIR,
                      int(tok["eod_id"]), int(tok["vocab_size"]))


def save_docmeta(path: str | Path, component: np.ndarray, nbytes: np.ndarray) -> None:
    """Write ``<split>.docmeta.npz`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Arrays may be memmaps of the spill files: np.savez streams them into the zip.
        np.savez(f, component=np.asarray(component, dtype=np.int16), nbytes=np.asarray(nbytes, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())


def save_split_sidecars(shard_dir: str | Path, split: str, component: np.ndarray, nbytes: np.ndarray,
                        component_names: list[str]) -> None:
    """Write a split's per-document sidecars: ``<split>.docmeta.npz`` and ``<split>.components.json``."""
    save_docmeta(_docmeta_path(shard_dir, split), component, nbytes)
    atomic_write_json(_components_path(shard_dir, split), list(component_names))
