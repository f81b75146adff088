"""Token shards: Megatron MMIDIDX ``.bin/.idx`` read and write, the shard-dir API, and
readers/exporters for the formats others use (Pythia, nanoGPT, LMDB, TFRecord).

MMIDIDX (Megatron-LM ``megatron/core/datasets/indexed_dataset.py``, GPT-NeoX
``megatron/data/indexed_dataset.py``; Pythia's pre-tokenized Pile uses it unchanged):

    PREFIX.bin   the tokens of every sequence back to back, little-endian, of one dtype
    PREFIX.idx   b"MMIDIDX\\x00\\x00"          9 bytes magic
                 version                      uint64 LE, = 1
                 dtype code                   uint8 (1 uint8, 2 int8, 3 int16, 4 int32,
                                              5 int64, 6 float64, 7 float32, 8 uint16)
                 sequence count  S            uint64 LE
                 document count  D            uint64 LE (entries of doc_idx, i.e. documents + 1)
                 sizes                        int32[S]   tokens per sequence
                 pointers                     int64[S]   byte offset of each sequence in .bin
                 doc_idx                      int64[D]   first sequence of each document, then S

pilelm writes one sequence per document (so ``doc_idx = 0, 1, ..., S``), every document
followed by one EOD token, uint16 when the vocabulary fits and int32 otherwise.

Shard dir (``pilelm tokenize`` output): ``<split>.bin/.idx``, ``<split>.docmeta.npz``
(``component`` int16 code and ``nbytes`` int64 UTF-8 bytes per document),
``<split>.components.json`` (the component names, index = code), ``tokenizer/`` and
``manifest.json``. ``open_split`` opens one split of it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pilelm.core.atomic import atomic_path, atomic_write_json
from pilelm.core.manifest import read_manifest, require_stage

MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
MMIDIDX_VERSION = 1
# Megatron-core's DType enum (indexed_dataset.py); the codes are part of the file format.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQB")  # magic, version, dtype code
_COUNTS = struct.Struct("<QQ")  # sequence count, doc_idx length


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32.

    Ids run 0..vocab_size-1, so uint16 holds vocabularies up to 65535 entries here; anything
    larger goes int32 (storing ids >= 65536 as uint16 silently wraps them: the classic bug).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def _prefix(path: str | Path) -> Path:
    """``x``, ``x.bin`` or ``x.idx`` -> ``x``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


# ---------------------------------------------------------------- reading


class IndexedDataset:
    """A memory-mapped MMIDIDX dataset: ``ds[i]`` is sequence ``i`` (a document, for files
    pilelm writes; Megatron files made with sentence splitting group sequences into
    documents through ``doc_idx``, see ``document``)."""

    def __init__(self, prefix: str | Path):
        self.prefix = _prefix(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist (an MMIDIDX dataset needs both .bin and .idx)")
        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        head_len = _HEADER.size + _COUNTS.size
        if len(self._index) < head_len:
            raise ValueError(f"{idx_path}: {len(self._index)} bytes is too short for an MMIDIDX header")
        magic, version, code = _HEADER.unpack_from(self._index, 0)
        if magic != MMIDIDX_MAGIC:
            raise ValueError(f"{idx_path}: not an MMIDIDX index (magic {magic!r}, expected {MMIDIDX_MAGIC!r})")
        if version != MMIDIDX_VERSION:
            raise ValueError(f"{idx_path}: MMIDIDX version {version} is not supported (only 1)")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        n_seq, n_doc = _COUNTS.unpack_from(self._index, _HEADER.size)
        need = head_len + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if len(self._index) < need:
            raise ValueError(f"{idx_path}: truncated ({len(self._index)} bytes, the header promises {need})")
        off = head_len
        self.sizes = np.frombuffer(self._index, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(self._index, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.doc_idx = np.frombuffer(self._index, dtype="<i8", count=n_doc, offset=off)
        n_bin = bin_path.stat().st_size
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if n_bin < end:
            raise ValueError(f"{bin_path}: {n_bin} bytes, but the index needs {end}; the file is truncated")
        # np.memmap refuses empty files; an empty split is a valid (if useless) dataset.
        self.tokens: np.ndarray = (
            np.memmap(bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
            if n_bin
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (Megatron's ``get``)."""
        seq = self[i]
        return seq[offset : None if length is None else offset + length]

    def document(self, d: int) -> np.ndarray:
        """Document ``d`` through ``doc_idx``: the concatenation of its sequences."""
        lo, hi = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if hi <= lo:
            return self.tokens[0:0]
        start = int(self.pointers[lo]) // self.dtype.itemsize
        end = int(self.pointers[hi - 1]) // self.dtype.itemsize + int(self.sizes[hi - 1])
        return self.tokens[start:end]

    @property
    def num_documents(self) -> int:
        return max(0, len(self.doc_idx) - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------- writing


class AppendFile:
    """A raw little-endian array file grown by appends, that can be cut back to a known
    length: the unit of resumable writing (flush + record the length; on resume, truncate)."""

    def __init__(self, path: str | Path, dtype: np.dtype | type, resume_items: int | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_items is None:
            self._f = open(self.path, "wb")
            self.items = 0
        else:
            if not self.path.is_file() or self.path.stat().st_size < resume_items * self.dtype.itemsize:
                raise ValueError(f"{self.path}: cannot resume at {resume_items} items; the file is shorter")
            self._f = open(self.path, "r+b")
            self._f.truncate(resume_items * self.dtype.itemsize)
            self._f.seek(0, os.SEEK_END)
            self.items = resume_items

    def append(self, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=self.dtype)
        self._f.write(memoryview(arr).cast("B"))
        self.items += len(arr)

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def read(self) -> np.ndarray:
        """The whole file as a read-only memmap (after ``close``)."""
        if self.items == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.items,))


def write_index(idx_path: str | Path, sizes: np.ndarray, dtype: np.dtype, doc_idx: np.ndarray | None = None,
                chunk: int = 1 << 22) -> None:
    """Write an MMIDIDX ``.idx`` for sequences of ``sizes`` tokens stored back to back.

    Streams in chunks, so ``sizes`` may be a memmap bigger than memory allows twice over.
    """
    dtype = np.dtype(dtype)
    n = len(sizes)
    if doc_idx is None:
        doc_idx = np.arange(n + 1, dtype=np.int64)
    with atomic_path(idx_path) as tmp, open(tmp, "wb") as f:
        f.write(_HEADER.pack(MMIDIDX_MAGIC, MMIDIDX_VERSION, CODE_OF_DTYPE[dtype]))
        f.write(_COUNTS.pack(n, len(doc_idx)))
        for s in range(0, n, chunk):
            f.write(np.asarray(sizes[s : s + chunk], dtype="<i4").tobytes())
        offset = 0
        for s in range(0, n, chunk):
            part = np.asarray(sizes[s : s + chunk], dtype=np.int64) * dtype.itemsize
            ptr = np.cumsum(part) - part + offset
            offset += int(part.sum())
            f.write(ptr.astype("<i8").tobytes())
        for s in range(0, len(doc_idx), chunk):
            f.write(np.asarray(doc_idx[s : s + chunk], dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


class IndexedDatasetWriter:
    """Write ``PREFIX.bin/.idx``: ``add_document(ids)`` per document, then ``finalize()``.

    Tokens and sizes stream to temporary files beside the output (memory stays constant);
    ``finalize`` writes the index and renames both into place, so a reader never sees a
    half-written dataset. ``flush()`` returns the state a resumed writer starts from.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type, *, work_dir: str | Path | None = None,
                 resume: tuple[int, int] | None = None):
        self.prefix = _prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        work = Path(work_dir) if work_dir is not None else self.prefix.parent
        name = self.prefix.name
        docs, tokens = resume if resume is not None else (None, None)
        self._bin = AppendFile(work / f".{name}.bin.partial", self.dtype, tokens)
        self._sizes = AppendFile(work / f".{name}.sizes.partial", np.int32, docs)
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    @property
    def num_documents(self) -> int:
        return self._sizes.items

    @property
    def num_tokens(self) -> int:
        return self._bin.items

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        self.add_documents(arr, np.array([len(arr)], dtype=np.int32))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append several documents at once: their tokens back to back and their lengths."""
        tokens = np.asarray(tokens)
        if int(np.sum(sizes, dtype=np.int64)) != len(tokens):
            raise ValueError(f"sizes sum to {int(np.sum(sizes))} but {len(tokens)} tokens were given")
        if len(tokens) and self._info is not None and tokens.dtype != self.dtype:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(f"token id {hi if hi > self._info.max else lo} does not fit {self.dtype} "
                                 f"({self.prefix}); write int32 shards for this vocabulary")
        self._bin.append(tokens)
        self._sizes.append(sizes)

    def flush(self) -> tuple[int, int]:
        """Make everything appended so far durable; returns (documents, tokens)."""
        self._bin.flush()
        self._sizes.flush()
        return self.num_documents, self.num_tokens

    def finalize(self) -> Path:
        self.flush()
        self._bin.close()
        self._sizes.close()
        write_index(self.prefix.with_suffix(".idx.tmp"), self._sizes.read(), self.dtype)
        # .bin first, then .idx: an .idx always describes a complete .bin.
        os.replace(self._bin.path, self.prefix.with_suffix(".bin"))
        os.replace(self.prefix.with_suffix(".idx.tmp"), self.prefix.with_suffix(".idx"))
        self._sizes.path.unlink(missing_ok=True)
        return self.prefix

    def abort(self) -> None:
        self._bin.close()
        self._sizes.close()
        self._bin.path.unlink(missing_ok=True)
        self._sizes.path.unlink(missing_ok=True)


def write_indexed_dataset(prefix: str | Path, documents: Iterable[Iterable[int]], dtype: np.dtype | type) -> Path:
    """Write a whole MMIDIDX dataset from an iterable of token sequences."""
    w = IndexedDatasetWriter(prefix, dtype)
    try:
        for doc in documents:
            w.add_document(doc)
    except BaseException:
        w.abort()
        raise
    return w.finalize()


# ---------------------------------------------------------------- the shard dir


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
    prefix = shard_dir / split
    if not prefix.with_suffix(".idx").is_file():
        have = sorted(p.stem for p in shard_dir.glob("*.idx"))
        raise FileNotFoundError(f"{shard_dir} has no split {split!r} (splits: {', '.join(have) or 'none'})")
    ds = IndexedDataset(prefix)
    meta_path = shard_dir / f"{split}.docmeta.npz"
    with np.load(meta_path) as meta:
        component = np.asarray(meta["component"])
        nbytes = np.asarray(meta["nbytes"])
    if len(component) != len(ds) or len(nbytes) != len(ds):
        raise ValueError(f"{meta_path}: {len(component)} documents, but {prefix}.idx has {len(ds)}")
    names = json.loads((shard_dir / f"{split}.components.json").read_text())
    tok = manifest.get("extra", {}).get("tokenizer", {})
    return TokenSplit(ds, component, list(names), nbytes, shard_dir / "tokenizer",
                      int(tok["eod_id"]), int(tok["vocab_size"]))


# ---------------------------------------------------------------- others' formats: Pythia, nanoGPT


def open_pythia(path: str | Path) -> IndexedDataset:
    """Pythia's pre-tokenized Pile (``pile_0.87_deduped_text_document.bin/.idx`` or the
    ``document.bin/.idx`` of EleutherAI/pile-*-pythia-preshuffled after merging its shards):
    MMIDIDX, uint16, GPT-NeoX-20B tokenizer, ``<|endoftext|>`` (id 0) after every document.

    ``path`` is the prefix or either file. The shards ``document-00000-of-00020.bin`` ... are
    the .bin cut in pieces; join them first (``cat document-*-of-*.bin > document.bin``).
    """
    prefix = _prefix(path)
    if not prefix.with_suffix(".bin").is_file():
        pieces = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.bin"))
        if pieces:
            raise FileNotFoundError(
                f"{prefix}.bin does not exist but {len(pieces)} shards of it do; join them first: "
                f"cat {prefix}-*-of-*.bin > {prefix}.bin"
            )
    return IndexedDataset(prefix)


# nanoGPT's data/openwebtext/prepare.py writes one flat uint16 array per split, each document
# followed by GPT-2's <|endoftext|> (50256); there is no header or index.
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


# ---------------------------------------------------------------- exporters


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


def _crc32c_table() -> list[list[int]]:
    base = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        base.append(c)
    # Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero bytes.
    tables = [base]
    for k in range(1, 8):
        prev = tables[k - 1]
        tables.append([(prev[b] >> 8) ^ base[prev[b] & 0xFF] for b in range(256)])
    return tables


_CRC_TABLES: list[list[int]] | None = None


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (google_crc32c when installed, else slicing-by-8 in Python)."""
    try:
        import google_crc32c  # optional accelerator
    except ImportError:
        pass
    else:
        return int(google_crc32c.value(data))
    global _CRC_TABLES
    if _CRC_TABLES is None:
        _CRC_TABLES = _crc32c_table()
    t0, t1, t2, t3, t4, t5, t6, t7 = _CRC_TABLES
    crc = 0xFFFFFFFF
    n8 = len(data) - len(data) % 8
    for (w,) in struct.iter_unpack("<Q", data[:n8]):
        w ^= crc
        crc = (t7[w & 0xFF] ^ t6[(w >> 8) & 0xFF] ^ t5[(w >> 16) & 0xFF] ^ t4[(w >> 24) & 0xFF]
               ^ t3[(w >> 32) & 0xFF] ^ t2[(w >> 40) & 0xFF] ^ t1[(w >> 48) & 0xFF] ^ t0[w >> 56])
    for b in data[n8:]:
        crc = (crc >> 8) ^ t0[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varints(values: np.ndarray) -> bytes:
    """Protobuf base-128 varints of non-negative integers, vectorised."""
    v = np.asarray(values, dtype=np.uint64)
    if len(v) == 0:
        return b""
    nbytes = np.ones(len(v), dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1) << np.uint64(7 * k)
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for k in range(int(nbytes.max())):
        has = nbytes > k
        byte = (v[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _varint(n: int) -> bytes:
    return _varints(np.array([n]))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def tf_example(features: dict[str, np.ndarray]) -> bytes:
    """Serialize a ``tf.train.Example`` of int64 features (tensorflow/core/example/example.proto,
    feature.proto): Example{1: Features{1: map<string, Feature{3: Int64List{1: packed}}>}}."""
    entries = b""
    for name, values in features.items():
        if np.any(np.asarray(values) < 0):
            raise ValueError(f"feature {name}: negative values need 10-byte varints; not supported here")
        int64_list = _field(1, _varints(values))
        feature = _field(3, int64_list)
        entry = _field(1, name.encode()) + _field(2, feature)
        entries += _field(1, entry)
    return _field(1, entries)


def tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def export_tfrecord(ds: IndexedDataset, path: str | Path, component: np.ndarray | None = None,
                    feature: str = "input_ids") -> Path:
    """One ``tf.train.Example`` per document: int64 feature ``feature`` with its tokens (and
    ``component`` with its component code when given), framed as TFRecord, no TensorFlow."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(len(ds)):
            feats = {feature: np.asarray(ds[i])}
            if component is not None:
                feats["component"] = np.array([int(component[i])])
            f.write(tfrecord_frame(tf_example(feats)))
    return path


def read_tfrecord(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord file, each CRC-checked when ``verify``."""
    with open(path, "rb") as f:
        n = 0
        while head := f.read(12):
            if len(head) < 12:
                raise ValueError(f"{path}: record {n} header is cut off")
            (length,) = struct.unpack_from("<Q", head)
            (length_crc,) = struct.unpack_from("<I", head, 8)
            if verify and masked_crc32c(head[:8]) != length_crc:
                raise ValueError(f"{path}: record {n} length CRC mismatch")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise ValueError(f"{path}: record {n} is cut off")
            if verify and masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                raise ValueError(f"{path}: record {n} data CRC mismatch")
            yield data
            n += 1


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key & 7 != 2:
            raise ValueError(f"unexpected protobuf wire type {key & 7}")
        n, pos = _read_varint(buf, pos)
        yield key >> 3, buf[pos : pos + n]
        pos += n


def parse_tf_example(data: bytes) -> dict[str, np.ndarray]:
    """The int64 features of a serialized ``tf.train.Example`` (the subset ``tf_example`` writes)."""
    out: dict[str, np.ndarray] = {}
    for num, features in _fields(data):
        if num != 1:
            continue
        for _, entry in _fields(features):
            name, feature = "", b""
            for k, v in _fields(entry):
                if k == 1:
                    name = v.decode()
                elif k == 2:
                    feature = v
            values: list[int] = []
            for kind, lst in _fields(feature):
                if kind != 3:
                    raise ValueError(f"feature {name}: only int64_list is supported")
                for _, packed in _fields(lst):
                    pos = 0
                    while pos < len(packed):
                        x, pos = _read_varint(packed, pos)
                        values.append(x)
            out[name] = np.array(values, dtype=np.int64)
    return out


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


def save_docmeta(path: str | Path, component: np.ndarray, nbytes: np.ndarray) -> None:
    """Write ``<split>.docmeta.npz`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Arrays may be memmaps of the spill files: np.savez streams them into the zip.
        np.savez(f, component=np.asarray(component, dtype=np.int16), nbytes=np.asarray(nbytes, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- export / import as stages


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
    from pilelm.core.manifest import write_manifest
    from pilelm.tokens.tokenizer import (  # (tokenizer imports nothing from here)
        copy_tokenizer,
        load_tokenizer,
    )

    if cfg.source is None or cfg.tokenizer is None or cfg.output is None:
        raise ValueError("give the source tokens, their tokenizer and an output shard dir")
    out = Path(cfg.output)
    tok = load_tokenizer(cfg.tokenizer, fast=False)
    eod = cfg.eod_id if cfg.eod_id is not None else tok.eod_id
    if eod is None:
        raise ValueError(f"eod_id: tokenizer {cfg.tokenizer} has no end-of-document token; give eod_id")
    out.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out) if (out / "manifest.json").is_file() else {}
    (out / "manifest.json").unlink(missing_ok=True)
    copy_tokenizer(cfg.tokenizer, out / "tokenizer")
    if cfg.format == "nanogpt":
        docs: Iterable[np.ndarray] = split_documents(read_nanogpt(cfg.source), int(eod))
    else:
        src = IndexedDataset(cfg.source)
        docs = (src.document(d) for d in range(src.num_documents))
    dtype = token_dtype(tok.vocab_size)
    writer = IndexedDatasetWriter(out / cfg.split, dtype)
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
    save_docmeta(out / f"{cfg.split}.docmeta.npz", np.zeros(len(nbytes), np.int16), np.array(nbytes, np.int64))
    atomic_write_json(out / f"{cfg.split}.components.json", [cfg.component])
    ds = IndexedDataset(out / cfg.split)
    splits = dict(previous.get("counts", {}).get("splits", {}))
    splits[cfg.split] = {"documents": len(ds), "tokens": ds.num_tokens, "bytes": int(sum(nbytes)),
                         "imported_from": str(cfg.source)}
    counts = {"documents": sum(s["documents"] for s in splits.values()),
              "tokens": sum(s["tokens"] for s in splits.values()), "splits": splits}
    extra = {"tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": int(eod),
                           "pad_id": tok.pad_id, "source": str(cfg.tokenizer)}, "dtype": dtype.name}
    write_manifest(out, "tokenize", cfg, inputs=[cfg.source if cfg.format == "nanogpt"
                                                 else _prefix(cfg.source).with_suffix(".idx")],
                   counts=counts, extra=extra)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pilelm.tokens.shards export|import ...``: see ``--help``."""
    import argparse
    import logging
    import sys

    ap = argparse.ArgumentParser(prog="python -m pilelm.tokens.shards",
                                 description="convert token shards to and from others' formats")
    sub = ap.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="a split of a shard dir as nanoGPT .bin, LMDB or TFRecord")
    ex.add_argument("data", type=Path, help="shard dir (pilelm tokenize output)")
    ex.add_argument("--split", default="train")
    ex.add_argument("--format", choices=["nanogpt", "lmdb", "tfrecord"], required=True)
    ex.add_argument("-o", "--output", type=Path, required=True)
    im = sub.add_parser("import", help="Pythia/Megatron MMIDIDX or nanoGPT .bin into a shard dir")
    im.add_argument("source", type=Path, help="MMIDIDX prefix/.bin/.idx, or a nanoGPT .bin")
    im.add_argument("--format", choices=["mmidx", "nanogpt"], default="mmidx")
    im.add_argument("--tokenizer", type=Path, required=True, help="the ids' tokenizer (dir, tokenizer.json, .tiktoken)")
    im.add_argument("--split", choices=["train", "val", "test"], default="train")
    im.add_argument("--component", default="unknown")
    im.add_argument("--eod-id", type=int, default=None)
    im.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.action == "export":
            out = run_shard_export(ShardExportConfig(args.data, args.split, args.format, args.output))
        else:
            out = run_shard_import(ShardImportConfig(args.source, args.format, args.tokenizer, args.output,
                                                     args.split, args.component, args.eod_id))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m pilelm.tokens.shards {args.action}: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
