"""Record parsing: JSON lines (plain, ``.zst``, ``.gz``), Parquet, ``.txt`` files and Hugging Face
datasets become Documents; bad input becomes a counted, reasoned rejection, never a crash or a
silent drop. Which files to read is ``pilelm.data.sources``' business.

- ``.zst`` is read with a streaming decompressor: the Pile's frames carry no content size.
  A stream that ``sources`` found cut off yields a ``truncated_file`` rejection where it ends.
  Every decompression is capped (``pilelm.data.decompress``): a stream expanding beyond
  ``reader.max_decompression_ratio`` ends in a ``decompression_bomb`` rejection.
- Memory stays bounded: data is read in 8 MiB chunks and one line is held at most
  ``max_line_bytes`` long; a longer line is skipped (and counted) without being buffered.
- A file can be read by byte range (offsets in the decompressed stream): a range owns the
  lines that start inside it, so ranges tile a file exactly. Line numbers stay true because
  the bytes before the range are still read (and counted) rather than seeked over.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import zstandard

from pilelm.data.decompress import DEFAULT_MAX_RATIO, DecompressionBombError, open_decompressed
from pilelm.data.document import COMPONENT_KEY, LONE_SURROGATE, Document
from pilelm.data.sources import SourceFile, expand_inputs, parse_hf_spec

log = logging.getLogger(__name__)


READ_CHUNK = 8 << 20


@dataclass
class ReaderConfig:
    text_field: str = "text"
    """Record field holding the document text (dotted for nested fields, e.g. `content.body`)."""
    component_field: str = "meta.pile_set_name"
    """Record field naming the document's component (source); dotted for nested fields."""
    id_field: str | None = None
    """Record field with a document id; None: the id is `file:line`."""
    default_component: str | None = None
    """Component of records without one (and of .txt files); None: the input's own name
    (a folder's name, or the file name without its extensions)."""
    max_line_bytes: int = 64 << 20
    """Longest record (line, .txt file) read; longer ones are skipped as `line_too_long`,
    so memory stays bounded whatever the input."""
    on_bad_unicode: Literal["skip", "replace"] = "skip"
    """Records with invalid UTF-8 or lone surrogates: `skip` them (counted, logged) or
    `replace` the bad code points with U+FFFD and keep them."""
    on_bad_file: Literal["error", "skip"] = "error"
    """An input file that cannot be read as named (a .parquet or .txt holding something else, an
    unreadable file): `error` stops before any work starts; `skip` leaves it out, named with its
    reason in the manifest and stats.md, and goes on. (Gzip or plain JSON lines behind a .zst
    name are read by their content either way.)"""
    max_decompression_ratio: int = DEFAULT_MAX_RATIO
    """A compressed stream producing more than this many times its compressed bytes is cut off as
    `decompression_bomb` (text compresses 3-10x; bombs millions)."""

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("reader.text_field must name a record field, e.g. text")
        if self.max_line_bytes < 1024:
            raise ValueError(f"reader.max_line_bytes={self.max_line_bytes} is too small; use >= 1024")
        if self.on_bad_unicode not in ("skip", "replace"):
            raise ValueError("reader.on_bad_unicode must be skip or replace")
        if self.on_bad_file not in ("error", "skip"):
            raise ValueError("reader.on_bad_file must be error or skip")
        if self.max_decompression_ratio < 10:
            raise ValueError(f"reader.max_decompression_ratio={self.max_decompression_ratio} is below what "
                             "text compresses to; use >= 10")


@dataclass(slots=True)
class Rejected:
    """A record that could not be read; ``source`` is ``file:line``."""

    source: str
    reason: str
    detail: str = ""
    component: str = ""
    nbytes: int = 0
    preview: str = ""


# ---------------------------------------------------------------- byte streams and lines


def open_stream(src: SourceFile, max_ratio: float = DEFAULT_MAX_RATIO) -> BinaryIO:
    """The decompressed byte stream of a file; ``read(n)`` never returns more than n bytes,
    and the output is capped at ``max_ratio`` x the input (``DecompressionBombError``)."""
    return open_decompressed(src.path, src.compression, max_ratio)


@dataclass(slots=True)
class Line:
    number: int
    data: bytes | None
    """None when the line was longer than the limit (its bytes were not kept)."""
    length: int
    terminated: bool = True
    """False for a last line that the stream ended without a newline."""


def iter_lines(stream: BinaryIO, start: int = 0, end: int | None = None,
               max_line: int = 64 << 20) -> Iterator[Line]:
    """Lines (without the newline) whose first byte lies in ``[start, end)``.

    Reads 8 MiB chunks; a line over ``max_line`` bytes is yielded with ``data=None`` and its
    bytes are dropped as they stream by, so memory stays bounded.
    """
    offset = 0  # decompressed offset of the next chunk
    number = 1  # line number of the current line
    cur_start = 0  # offset where the current line began
    parts: list[bytes] = []
    cur_len = 0
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        base, offset = offset, offset + len(chunk)
        i = 0
        if cur_start < start and offset < start:
            # Whole chunk before the range: only count its lines.
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                number += chunk.count(b"\n")
                cur_start = base + nl + 1
            continue
        n = len(chunk)
        while i < n:
            j = chunk.find(b"\n", i)
            stop = n if j < 0 else j
            if cur_start >= start:
                cur_len += stop - i
                if cur_len <= max_line:
                    parts.append(chunk[i:stop])
                elif parts:
                    parts.clear()
            if j < 0:
                break
            if cur_start >= start:
                if cur_len <= max_line:
                    yield Line(number, parts[0] if len(parts) == 1 else b"".join(parts), cur_len)
                else:
                    yield Line(number, None, cur_len)
            parts.clear()
            cur_len = 0
            number += 1
            cur_start = base + j + 1
            if end is not None and cur_start >= end:
                return
            i = j + 1
    if cur_start >= start and (cur_len or parts) and (end is None or cur_start < end):
        yield Line(number, b"".join(parts) if cur_len <= max_line else None, cur_len, False)


# ---------------------------------------------------------------- records -> documents


def get_field(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass
class _RecordParser:
    src: SourceFile
    cfg: ReaderConfig
    _text_key: list[str] = field(init=False)
    _top_keys: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self._text_key = self.cfg.text_field.split(".")
        self._top_keys = {self._text_key[0], "meta"}

    def reject(self, number: int, reason: str, detail: str = "", raw: bytes | str = b"",
               component: str = "", nbytes: int = 0) -> Rejected:
        preview = raw[:120].decode("utf-8", "replace") if isinstance(raw, bytes) else raw[:120]
        return Rejected(f"{self.src.display}:{number}", reason, detail, component, nbytes, preview)

    def parse_line(self, line: Line) -> Document | Rejected | None:
        if line.data is None:
            return self.reject(line.number, "line_too_long",
                               f"{line.length} bytes > reader.max_line_bytes={self.cfg.max_line_bytes}",
                               nbytes=line.length)
        data = line.data
        if not data.strip():
            return None  # blank line: not a record
        try:
            record = json.loads(data)
        except UnicodeDecodeError as e:
            if self.cfg.on_bad_unicode == "skip":
                return self.reject(line.number, "invalid_utf8", str(e)[:200], data, nbytes=len(data))
            try:
                record = json.loads(data.decode("utf-8", "replace"))
            except ValueError as e2:
                return self.reject(line.number, "invalid_json", str(e2)[:200], data, nbytes=len(data))
            except RecursionError:
                return self.reject(line.number, "invalid_json", "nested too deeply", data, nbytes=len(data))
        except ValueError as e:  # json.JSONDecodeError, RecursionError is not expected here
            return self.reject(line.number, "invalid_json", str(e)[:200], data, nbytes=len(data))
        except RecursionError:
            return self.reject(line.number, "invalid_json", "nested too deeply", data, nbytes=len(data))
        return self.to_document(record, line.number, len(data), data)

    def to_document(self, record: Any, number: int, nbytes: int, raw: bytes | str = b"") -> Document | Rejected:
        if not isinstance(record, dict):
            return self.reject(number, "not_an_object", f"a JSON {type(record).__name__}", raw, nbytes=nbytes)
        comp = get_field(record, self.cfg.component_field)
        comp = self.src.component if comp is None or comp == "" else str(comp)
        text = get_field(record, self.cfg.text_field)
        if text is None:
            return self.reject(number, "missing_text", f"no field {self.cfg.text_field!r}", raw, comp, nbytes)
        if not isinstance(text, str):
            return self.reject(number, "text_not_string",
                               f"{self.cfg.text_field!r} is a {type(text).__name__}", raw, comp, nbytes)
        if LONE_SURROGATE.search(text):
            if self.cfg.on_bad_unicode == "skip":
                return self.reject(number, "lone_surrogate", "text holds UTF-16 surrogates that are not "
                                   "valid Unicode scalar values", raw, comp, nbytes)
            text = LONE_SURROGATE.sub("\ufffd", text)
        meta = record.get("meta")
        meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
        if len(self._text_key) == 1:
            for k, v in record.items():  # other top-level fields (url, timestamp ...) go to meta
                if k not in self._top_keys:
                    meta.setdefault(k, v)
        meta[COMPONENT_KEY] = comp
        doc_id = f"{self.src.display}:{number}"
        if self.cfg.id_field:
            value = get_field(record, self.cfg.id_field)
            if value is not None:
                doc_id = str(value).replace("\n", " ")
        return Document(doc_id, text, meta)


def iter_source(src: SourceFile, cfg: ReaderConfig | None = None, start: int = 0,
                end: int | None = None) -> Iterator[Document | Rejected]:
    """Documents and rejections of one source, restricted to ``[start, end)``: decompressed
    byte offsets for JSON lines, row-group indices for Parquet; .txt and hf sources are read
    whole."""
    cfg = cfg or ReaderConfig()
    parser = _RecordParser(src, cfg)
    if src.format == "jsonl":
        yield from _iter_jsonl(src, parser, start, end)
    elif src.format == "parquet":
        yield from _iter_parquet(src, parser, start, end)
    elif src.format == "txt":
        yield from _iter_txt(src, parser)
    elif src.format == "hf":
        yield from _iter_hf(src, parser)
    else:  # pragma: no cover - expand_inputs only makes the formats above
        raise ValueError(f"{src.path}: unsupported format {src.format}")


def _iter_jsonl(src: SourceFile, parser: _RecordParser, start: int, end: int | None
                ) -> Iterator[Document | Rejected]:
    last: Line | None = None
    stream = open_stream(src, parser.cfg.max_decompression_ratio)
    try:
        lines = iter_lines(stream, start, end, parser.cfg.max_line_bytes)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except DecompressionBombError as e:
                number = last.number + 1 if last else 1
                yield parser.reject(number, "decompression_bomb", f"{e}; the rest of this file is skipped")
                return
            except (zstandard.ZstdError, OSError, EOFError, zlib.error) as e:
                # Corrupt or cut-off compressed data: keep what was read, count the loss.
                number = last.number + 1 if last else 1
                yield parser.reject(number, "corrupt_compressed_data",
                                    f"{type(e).__name__}: {e}; later records of this file are lost")
                return
            last = line
            if src.damage and not line.terminated:
                yield parser.reject(line.number, "truncated_file",
                                    f"{src.damage}; this last, partial record is dropped",
                                    line.data or b"", nbytes=line.length)
                return
            item = parser.parse_line(line)
            if item is not None:
                yield item
        if src.damage and end is None:
            number = last.number + 1 if last else 1
            yield parser.reject(number, "truncated_file", f"{src.damage}; records after this point are lost")
    finally:
        stream.close()


def _iter_parquet(src: SourceFile, parser: _RecordParser, start: int, end: int | None
                  ) -> Iterator[Document | Rejected]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise ValueError(f"{src.path}: not a readable Parquet file ({e})") from e
    n_groups = pf.metadata.num_row_groups
    groups = list(range(start, n_groups if end is None else min(end, n_groups)))
    row = 1 + sum(pf.metadata.row_group(g).num_rows for g in range(start))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
        for record in batch.to_pylist():
            yield parser.to_document(record, row, 0)
            row += 1


def _iter_txt(src: SourceFile, parser: _RecordParser) -> Iterator[Document | Rejected]:
    if src.size > parser.cfg.max_line_bytes:
        yield parser.reject(1, "line_too_long", f"{src.size} bytes > reader.max_line_bytes", nbytes=src.size)
        return
    data = Path(src.path).read_bytes()
    if not data.strip():
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if parser.cfg.on_bad_unicode == "skip":
            yield parser.reject(1, "invalid_utf8", str(e)[:200], data, src.component, len(data))
            return
        text = data.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    meta = {COMPONENT_KEY: src.component, "source_file": src.display}
    yield Document(src.display, text, meta)


def _iter_hf(src: SourceFile, parser: _RecordParser) -> Iterator[Document | Rejected]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{src.path}: reading Hugging Face datasets needs `pip install datasets`") from e
    name, config, split = parse_hf_spec(src.path)
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, record in enumerate(ds, start=1):
        yield parser.to_document(dict(record), i, 0)


def read_documents(paths: Iterable[str | Path], cfg: ReaderConfig | None = None) -> Iterator[Document]:
    """Documents of files, folders, globs or a prepared directory, in input order.

    Unreadable records are skipped with a warning naming file and line (``pilelm prepare``
    counts them and writes them to its rejects log instead).
    """
    cfg = cfg or ReaderConfig()
    for src in expand_inputs([str(p) for p in paths], cfg.default_component):
        for item in iter_source(src, cfg):
            if isinstance(item, Rejected):
                log.warning("skipped %s: %s %s", item.source, item.reason, item.detail)
            else:
                yield item
