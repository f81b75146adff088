"""Megatron MMIDIDX ``.bin/.idx`` token files: reading (memory-mapped), writing (streaming,
resumable) and the dtype rules.

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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_path

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


def mmidx_prefix(path: str | Path) -> Path:
    """``x``, ``x.bin`` or ``x.idx`` -> ``x``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


# ---------------------------------------------------------------- reading


class IndexedDataset:
    """A memory-mapped MMIDIDX dataset: ``ds[i]`` is sequence ``i`` (a document, for files
    pilelm writes; Megatron files made with sentence splitting group sequences into
    documents through ``doc_idx``, see ``document``)."""

    def __init__(self, prefix: str | Path):
        self.prefix = mmidx_prefix(prefix)
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
        self.prefix = mmidx_prefix(prefix)
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
