"""``pilelm shards export|import``: token shards to and from the formats other tools use.

- export: a split of a shard dir as nanoGPT's flat ``.bin``, an LMDB or a TFRecord file
  (``pilelm.tokens.formats``).
- import: tokens made elsewhere (Pythia / Megatron / GPT-NeoX MMIDIDX, a nanoGPT ``.bin``)
  become a shard dir that ``pilelm train`` and ``pilelm eval`` take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pilelm.core.manifest import MANIFEST, read_manifest, write_manifest
from pilelm.tokens.formats.lmdb import export_lmdb
from pilelm.tokens.formats.nanogpt import export_nanogpt, read_nanogpt, split_documents
from pilelm.tokens.formats.tfrecord import export_tfrecord
from pilelm.tokens.identity import require_same_tokenizer, tokenizer_fingerprint
from pilelm.tokens.mmidx import IndexedDataset, IndexedDatasetWriter, mmidx_prefix, token_dtype
from pilelm.tokens.shards import TOKENIZER_DIR, open_split, save_split_sidecars, split_prefix
from pilelm.tokens.tokenizer import copy_tokenizer, load_tokenizer


def export_split(shard_dir: str | Path, split: str, fmt: str, output: str | Path) -> Path:
    """Export one split of a shard dir as ``nanogpt`` (.bin), ``lmdb`` or ``tfrecord``."""
    ts = open_split(shard_dir, split)
    if fmt == "nanogpt":
        return export_nanogpt(ts.dataset, output)
    if fmt == "lmdb":
        meta = {"eod_id": ts.eod_id, "vocab_size": ts.vocab_size, "component_names": ts.component_names}
        return export_lmdb(ts.dataset, output, meta, component=ts.component)
    if fmt == "tfrecord":
        return export_tfrecord(ts.dataset, output, ts.component)
    raise ValueError(f"format must be nanogpt, lmdb or tfrecord, got {fmt!r}")


@dataclass
class ShardExportConfig:
    data: Path | None = None
    """Shard directory (`pilelm tokenize` output)."""
    split: str = "train"
    """Split to export."""
    format: Literal["nanogpt", "lmdb", "tfrecord"] = "nanogpt"
    """nanogpt: flat uint16 .bin; lmdb: one record per document; tfrecord: one tf.train.Example
    (int64 `input_ids`, `component`) per document."""
    output: Path | None = None
    """Output file (nanogpt, tfrecord) or LMDB directory."""

    def __post_init__(self) -> None:
        if self.format not in ("nanogpt", "lmdb", "tfrecord"):
            raise ValueError(f"format must be nanogpt, lmdb or tfrecord, got {self.format!r}")


def run_shard_export(cfg: ShardExportConfig) -> Path:
    if cfg.data is None or cfg.output is None:
        raise ValueError("give a shard dir and an output: SHARD_DIR --split train --format nanogpt -o OUT")
    return export_split(cfg.data, cfg.split, cfg.format, cfg.output)


@dataclass
class ShardImportConfig:
    source: Path | None = None
    """Tokens made elsewhere: an MMIDIDX prefix or file (Pythia, Megatron, GPT-NeoX) or a
    nanoGPT flat uint16 .bin."""
    format: Literal["mmidx", "nanogpt"] = "mmidx"
    """Format of `source`."""
    tokenizer: Path | None = None
    """The tokenizer the ids belong to (GPT-NeoX-20B's for Pythia, GPT-2's for nanoGPT)."""
    output: Path | None = None
    """Shard directory to write (or add a split to)."""
    split: Literal["train", "val", "test"] = "train"
    """Split the tokens become."""
    component: str = "unknown"
    """Component name of every document (these formats keep none)."""
    eod_id: int | None = None
    """Token that ends each document; None: the tokenizer's."""

    def __post_init__(self) -> None:
        if self.format not in ("mmidx", "nanogpt"):
            raise ValueError(f"format must be mmidx or nanogpt, got {self.format!r}")


def run_shard_import(cfg: ShardImportConfig, batch: int = 1024) -> Path:
    """Make a shard dir (stage "tokenize", so `pilelm train` and `pilelm eval` take it) from
    tokens written by others: one sequence per document ending with EOD, and each document's
    text bytes found by decoding it (what bits per byte needs)."""
    if cfg.source is None or cfg.tokenizer is None or cfg.output is None:
        raise ValueError("give the source tokens, their tokenizer and an output shard dir")
    out = Path(cfg.output)
    tok = load_tokenizer(cfg.tokenizer, fast=False)
    eod = cfg.eod_id if cfg.eod_id is not None else tok.eod_id
    if eod is None:
        raise ValueError(f"eod_id: tokenizer {cfg.tokenizer} has no end-of-document token; give eod_id")
    fingerprint = tokenizer_fingerprint(tok)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out) if (out / MANIFEST).is_file() else {}
    if previous:  # adding a split: its ids must mean what the other splits' ids mean
        require_same_tokenizer(cfg.tokenizer, out, what="shards import",
                               fix=f"import into a new shard dir, or give --tokenizer {out / TOKENIZER_DIR}")
    (out / MANIFEST).unlink(missing_ok=True)
    copy_tokenizer(cfg.tokenizer, out / TOKENIZER_DIR)
    if cfg.format == "nanogpt":
        docs: Iterable[np.ndarray] = split_documents(read_nanogpt(cfg.source), int(eod))
    else:
        src = IndexedDataset(cfg.source)
        docs = (src.document(d) for d in range(src.num_documents))
    dtype = token_dtype(tok.vocab_size)
    writer = IndexedDatasetWriter(split_prefix(out, cfg.split), dtype)
    nbytes: list[int] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        bodies = [p[:-1] if len(p) and p[-1] == eod else p for p in pending]
        texts = tok.hf.decode_batch([b.tolist() for b in bodies], skip_special_tokens=False)
        for body, text in zip(bodies, texts, strict=True):
            writer.add_document(np.append(np.asarray(body, dtype=np.int64), eod))
            nbytes.append(len(text.encode("utf-8")))
        pending.clear()

    try:
        for d in docs:
            pending.append(np.asarray(d))
            if len(pending) >= batch:
                flush()
        flush()
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
    save_split_sidecars(out, cfg.split, np.zeros(len(nbytes), np.int16), np.array(nbytes, np.int64), [cfg.component])
    ds = IndexedDataset(split_prefix(out, cfg.split))
    splits = dict(previous.get("counts", {}).get("splits", {}))
    splits[cfg.split] = {"documents": len(ds), "tokens": ds.num_tokens, "bytes": int(sum(nbytes)),
                         "imported_from": str(cfg.source)}
    counts = {"documents": sum(s["documents"] for s in splits.values()),
              "tokens": sum(s["tokens"] for s in splits.values()), "splits": splits}
    extra = {"tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": int(eod),
                           "pad_id": tok.pad_id, "fingerprint": fingerprint, "source": str(cfg.tokenizer)},
             "dtype": dtype.name}
    write_manifest(out, "tokenize", cfg, inputs=[cfg.source if cfg.format == "nanogpt"
                                                 else mmidx_prefix(cfg.source).with_suffix(".idx")],
                   counts=counts, extra=extra)
    return out
