"""nanoGPT's token files (``data/openwebtext/prepare.py``): one flat little-endian uint16 array
per split, each document followed by GPT-2's ``<|endoftext|>`` (50256); no header, no index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_path
from pilelm.tokens.mmidx import IndexedDataset, IndexedDatasetWriter

NANOGPT_DTYPE = np.dtype(np.uint16)
GPT2_EOT = 50256


def read_nanogpt(path: str | Path, dtype: np.dtype | type = NANOGPT_DTYPE) -> np.ndarray:
    """nanoGPT's flat token file as a read-only memmap (what its ``get_batch`` reads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    itemsize = np.dtype(dtype).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a whole number of {np.dtype(dtype)} tokens")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def split_documents(tokens: np.ndarray, eod_id: int) -> Iterator[np.ndarray]:
    """Documents of a flat token stream, each ending with its EOD (a trailing piece without
    one is yielded too)."""
    ends = np.flatnonzero(np.asarray(tokens) == eod_id) + 1
    start = 0
    for end in ends:
        yield tokens[start:end]
        start = int(end)
    if start < len(tokens):
        yield tokens[start:]


def nanogpt_to_indexed(path: str | Path, prefix: str | Path, eod_id: int = GPT2_EOT,
                       chunk: int = 1 << 24) -> Path:
    """Convert a nanoGPT ``.bin`` into MMIDIDX (documents cut after each EOD), streaming."""
    tokens = read_nanogpt(path)
    w = IndexedDatasetWriter(prefix, NANOGPT_DTYPE)
    try:
        carry = 0  # tokens of a document that started in an earlier chunk
        for s in range(0, len(tokens), chunk):
            part = np.asarray(tokens[s : s + chunk])
            ends = np.flatnonzero(part == eod_id) + 1
            if len(ends):
                sizes = np.diff(np.concatenate([[0], ends])).astype(np.int32)
                sizes[0] += carry
                w.add_documents(np.asarray(tokens[s - carry : s + int(ends[-1])]), sizes)
                carry = len(part) - int(ends[-1])
            else:
                carry += len(part)
        if carry:
            w.add_documents(np.asarray(tokens[len(tokens) - carry :]), np.array([carry], dtype=np.int32))
    except BaseException:
        w.abort()
        raise
    return w.finalize()


def export_nanogpt(ds: IndexedDataset, path: str | Path, chunk: int = 1 << 24) -> Path:
    """Write all tokens as nanoGPT's flat uint16 file (documents already end with EOD)."""
    if ds.dtype != NANOGPT_DTYPE:
        top = int(ds.tokens.max()) if len(ds.tokens) else 0
        if top > np.iinfo(np.uint16).max:
            raise ValueError(f"{ds.prefix}: token id {top} does not fit nanoGPT's uint16 format")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for s in range(0, len(ds.tokens), chunk):
            f.write(np.asarray(ds.tokens[s : s + chunk]).astype("<u2").tobytes())
    return path
