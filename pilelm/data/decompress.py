"""Decompression with a bound on what comes out: the one way pilelm opens compressed input.

A compressed file can expand without limit: a zstd RLE block is 4 bytes on disk and up to
128 KiB decompressed (RFC 8878 §3.1.1.2), so a 32 KiB file can stand for gigabytes. Every
decompression here is capped twice:

- **by output size per call**: data comes out in chunks of at most what the caller asks for
  (never "decompress this whole buffer"), so memory stays bounded whatever the input;
- **by the output/input ratio**: once a stream has produced more than ``max_ratio`` times
  the compressed bytes it has consumed (plus ``RATIO_SLACK`` for the first frames), it stops
  with ``DecompressionBombError`` naming the file, which readers turn into a counted
  rejection. Text compresses 3-10x with zstd or gzip (the Pile's shards about 4x);
  ``reader.max_decompression_ratio`` (default 1000) leaves room for very repetitive data.

A file's compression is taken from its first bytes (``content_compression``), not its name:
gzip or plain text behind a ``.zst`` name is read as what it is.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import BinaryIO

import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"

DEFAULT_MAX_RATIO = 1000
# Output allowed before the ratio applies: a small file may expand far more than the average
# (one 50 MB line of a repeated word compresses 10000x), so small legitimate files never trip it.
RATIO_SLACK = 64 << 20
# Planning samples this much output at most to estimate a file's ratio.
ESTIMATE_OUTPUT = 64 << 20
_RAW_READ = 1 << 20


class DecompressionBombError(ValueError):
    """A compressed stream expanded beyond the allowed output/input ratio."""


def is_zstd_magic(head: bytes) -> bool:
    """A zstd frame, or a skippable frame (magic 0x184D2A5?, RFC 8878 §3.1.2)."""
    return head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18")


def content_compression(head: bytes) -> str:
    """``zst``, ``gz`` or ``""`` (not compressed) from a file's first bytes."""
    if is_zstd_magic(head):
        return "zst"
    if head[:2] == GZIP_MAGIC:
        return "gz"
    return ""


class CappedStream(io.RawIOBase):
    """The decompressed bytes of ``raw`` (an open binary file) through ``inner``; raises
    ``DecompressionBombError`` when the output outgrows ``max_ratio`` x the input consumed."""

    def __init__(self, raw: BinaryIO, inner: BinaryIO, name: str, max_ratio: float):
        self.raw, self.inner, self.name, self.max_ratio = raw, inner, name, max_ratio
        self.produced = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 8 << 20  # never "everything": callers loop until b""
        data = self.inner.read(n)
        self.produced += len(data)
        consumed = self.raw.tell()
        if self.produced > self.max_ratio * consumed + RATIO_SLACK:
            raise DecompressionBombError(
                f"{self.name}: {self.produced:,} bytes came out of the first {consumed:,} compressed bytes "
                f"(more than {self.max_ratio:g}x); a decompression bomb or a corrupt file "
                "(raise reader.max_decompression_ratio if the data really is this repetitive)")
        return data

    def readinto(self, b: bytearray) -> int:  # io.RawIOBase's contract
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.raw.close()
            super().close()


def open_decompressed(path: str | Path, compression: str, max_ratio: float = DEFAULT_MAX_RATIO) -> BinaryIO:
    """The decompressed byte stream of a file (``compression``: zst, gz or ""); ``read(n)``
    never returns more than n bytes."""
    raw = open(path, "rb")
    if compression == "zst":
        inner = zstandard.ZstdDecompressor().stream_reader(raw, read_size=_RAW_READ, read_across_frames=True,
                                                           closefd=False)
    elif compression == "gz":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")
    else:
        return raw
    return CappedStream(raw, inner, str(path), max_ratio)  # type: ignore[return-value]


def estimate_ratio(path: str | Path, compression: str, sample: int = 1 << 20,
                   max_ratio: float = DEFAULT_MAX_RATIO) -> float:
    """Decompressed/compressed bytes of a file's first ``sample`` compressed bytes (at most
    ``ESTIMATE_OUTPUT`` of output is produced, in bounded chunks); at most ``max_ratio``.
    Errors (a corrupt or hostile head) give the cap or 1.0: reading the file reports them."""
    out = 0
    try:
        with open(path, "rb") as raw:
            if compression == "zst":
                inner = zstandard.ZstdDecompressor().stream_reader(raw, read_size=64 << 10,
                                                                   read_across_frames=True, closefd=False)
            else:
                inner = gzip.GzipFile(fileobj=raw, mode="rb")
            with inner:
                while out < ESTIMATE_OUTPUT and raw.tell() < sample:
                    chunk = inner.read(1 << 20)
                    if not chunk:
                        break
                    out += len(chunk)
                    if out > max_ratio * raw.tell() + RATIO_SLACK:
                        return float(max_ratio)
                consumed = raw.tell()
    except (zstandard.ZstdError, OSError, EOFError, zlib.error):
        return 1.0
    return min(float(max_ratio), max(1.0, out / max(1, consumed)))
