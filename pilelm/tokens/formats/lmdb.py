"""Token shards as LMDB: one record per document, for loaders that read by key."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pilelm.tokens.mmidx import IndexedDataset


def _lmdb_key(i: int) -> bytes:
    # Big-endian so LMDB's byte-order key sort is document order.
    return struct.pack(">Q", i)


LMDB_META_KEY = b"__meta__"
LMDB_COMPONENT_KEY = b"__component__"


def export_lmdb(ds: IndexedDataset, path: str | Path, meta: dict[str, Any] | None = None,
                component: np.ndarray | None = None, batch: int = 10_000) -> Path:
    """One LMDB record per document: key = document index (8-byte big-endian), value = its
    tokens as little-endian ``dtype`` bytes; ``__meta__`` holds dtype, count and ``meta``,
    ``__component__`` the int16 component code of every document (when given)."""
    import lmdb

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another path")
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    # LMDB's map is a sparse file: size it for the data plus per-record overhead, with room.
    map_size = 2 * (int(ds.tokens.nbytes) + 64 * len(ds)) + (64 << 20)
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, lock=False)
    try:
        for s in range(0, len(ds), batch):
            with env.begin(write=True) as txn:
                for i in range(s, min(s + batch, len(ds))):
                    txn.put(_lmdb_key(i), np.asarray(ds[i]).astype(ds.dtype.newbyteorder("<")).tobytes())
        info = {"dtype": ds.dtype.name, "documents": len(ds), **(meta or {})}
        with env.begin(write=True) as txn:
            txn.put(LMDB_META_KEY, json.dumps(info).encode())
            if component is not None:
                txn.put(LMDB_COMPONENT_KEY, np.asarray(component, dtype="<i2").tobytes())
        env.sync(True)
    finally:
        env.close()
    os.replace(tmp, path)
    return path


def read_lmdb(path: str | Path) -> tuple[dict[str, Any], Iterator[np.ndarray]]:
    """(meta, documents in order) of an LMDB written by ``export_lmdb``."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        raw = txn.get(LMDB_META_KEY)
    if raw is None:
        env.close()
        raise ValueError(f"{path}: no {LMDB_META_KEY!r} record; not written by pilelm's export_lmdb")
    meta = json.loads(raw)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")

    def docs() -> Iterator[np.ndarray]:
        try:
            with env.begin() as txn:
                for i in range(int(meta["documents"])):
                    value = txn.get(_lmdb_key(i))
                    if value is None:
                        raise ValueError(f"{path}: document {i} is missing")
                    yield np.frombuffer(value, dtype=dtype)
        finally:
            env.close()

    return meta, docs()


# TFRecord (tensorflow/core/lib/io/record_writer.cc): per record
#   uint64 LE length, uint32 LE masked_crc32c(length bytes), data, uint32 LE masked_crc32c(data)
# with masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2^32. CRC-32C is the Castagnoli
# polynomial, reflected 0x82F63B78 (RFC 3720 appendix B.4).
