"""Token shards as TFRecord of ``tf.train.Example``, written and read without TensorFlow.

TFRecord (tensorflow/core/lib/io/record_writer.cc): per record
  uint64 LE length, uint32 LE masked_crc32c(length bytes), data, uint32 LE masked_crc32c(data)
with masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2^32. CRC-32C is the Castagnoli
polynomial, reflected 0x82F63B78 (RFC 3720 appendix B.4).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pilelm.core.atomic import atomic_path
from pilelm.tokens.mmidx import IndexedDataset


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
