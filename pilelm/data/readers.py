"""Readers: JSON lines (plain, ``.zst``, ``.gz``), Parquet, folders of ``.txt``, Hugging Face
datasets; bad input becomes a counted, reasoned rejection, never a crash or a silent drop.

- Inputs are files, folders (searched recursively, hidden entries skipped) or globs. Each
  file belongs to a split: a file named ``val*`` / ``validation*`` / ``test*`` or inside a
  folder named ``val`` / ``valid`` / ``validation`` / ``test`` is eval data, all else train.
- A file's format comes from its extension and is checked against its first bytes, so a
  file whose content does not match its name is a clear error before any work starts.
- ``.zst`` is read with a streaming decompressor: the Pile's frames carry no content size.
  Truncation is found by walking the frame and block headers (RFC 8878 §3.1), because the
  streaming decompressor returns a cut-off frame's data without an error.
- Memory stays bounded: data is read in 8 MiB chunks and one line is held at most
  ``max_line_bytes`` long; a longer line is skipped (and counted) without being buffered.
- A file can be read by byte range (offsets in the decompressed stream): a range owns the
  lines that start inside it, so ranges tile a file exactly. Line numbers stay true because
  the bytes before the range are still read (and counted) rather than seeked over.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import zstandard

from pilelm.data.document import COMPONENT_KEY, Document

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_FILE = re.compile(r"^(val|valid|validation|test)(?![a-z])")
_SPLIT_DIRS = {"val": "val", "valid": "val", "validation": "val", "test": "test"}
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
READ_CHUNK = 8 << 20

# extension -> (format, compression)
_EXTENSIONS: dict[str, tuple[str, str]] = {
    ".jsonl": ("jsonl", ""), ".json": ("jsonl", ""), ".ndjson": ("jsonl", ""),
    ".jsonl.zst": ("jsonl", "zst"), ".json.zst": ("jsonl", "zst"), ".jsonl.zstd": ("jsonl", "zst"),
    ".jsonl.gz": ("jsonl", "gz"), ".json.gz": ("jsonl", "gz"), ".ndjson.gz": ("jsonl", "gz"),
    ".parquet": ("parquet", ""),
    ".txt": ("txt", ""),
}


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

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("reader.text_field must name a record field, e.g. text")
        if self.max_line_bytes < 1024:
            raise ValueError(f"reader.max_line_bytes={self.max_line_bytes} is too small; use >= 1024")
        if self.on_bad_unicode not in ("skip", "replace"):
            raise ValueError("reader.on_bad_unicode must be skip or replace")


@dataclass(frozen=True)
class SourceFile:
    """One input file (or Hugging Face dataset) and how to read it."""

    path: str
    """Path to open (or ``hf:`` spec)."""
    display: str
    """Name used in document ids and the rejects log (relative to the input given)."""
    split: str
    format: str
    compression: str
    size: int
    """On-disk bytes."""
    component: str
    """Component for records that name none."""
    damage: str = ""
    """Set when the compressed stream is cut off or corrupt: what is wrong and where."""


@dataclass(slots=True)
class Rejected:
    """A record that could not be read; ``source`` is ``file:line``."""

    source: str
    reason: str
    detail: str = ""
    component: str = ""
    nbytes: int = 0
    preview: str = ""


# ---------------------------------------------------------------- inputs and formats


def split_of(path: Path, root: Path | None) -> str:
    """The split a file belongs to (see the module docstring); ``root`` is the folder given."""
    m = _SPLIT_FILE.match(path.name.lower())
    if m:
        return "val" if m.group(1).startswith("val") else "test"
    parts: list[str] = []
    if root is not None:
        rel = path.parent.relative_to(root).parts if path.parent != root else ()
        parts = [root.name, *rel]
    else:
        parts = [path.parent.name]
    for name in reversed(parts):
        if name.lower() in _SPLIT_DIRS:
            return _SPLIT_DIRS[name.lower()]
    return "train"


def format_of(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _strip_extensions(name: str) -> str:
    fmt = format_of(name)
    if fmt is None:
        return name
    lower = name.lower()
    ext = max((e for e in _EXTENSIONS if lower.endswith(e)), key=len)
    return name[: -len(ext)]


def _sniff(path: Path, fmt: str, compression: str) -> None:
    """Raise ValueError if the first bytes of ``path`` contradict its extension."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return  # empty: nothing to contradict
    looks = (
        "zstd-compressed" if head == ZSTD_MAGIC or (head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18")
        else "gzip-compressed" if head[:2] == GZIP_MAGIC
        else "Parquet" if head == PARQUET_MAGIC
        else "plain text"
    )
    expected = {"zst": "zstd-compressed", "gz": "gzip-compressed"}.get(compression) or (
        "Parquet" if fmt == "parquet" else "plain text"
    )
    if looks != expected:
        raise ValueError(
            f"{path}: the file is named like {expected} data but its content is {looks} "
            f"(first bytes {head!r}); rename it to match its content or re-export it"
        )


def check_zstd_frames(path: str | Path) -> str:
    """Walk the zstd frame and block headers of ``path`` (RFC 8878 §3.1) without decompressing.

    Returns "" for a complete stream, else a description of where it is cut off or corrupt.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        frames = 0
        while pos < size:
            f.seek(pos)
            magic = f.read(4)
            if len(magic) < 4:
                return f"truncated: {len(magic)} stray bytes after frame {frames} at offset {pos}"
            if magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50:  # skippable frame
                n = f.read(4)
                if len(n) < 4:
                    return f"truncated inside skippable frame at offset {pos}"
                pos += 8 + int.from_bytes(n, "little")
                if pos > size:
                    return f"truncated inside skippable frame {frames}"
                frames += 1
                continue
            if magic != ZSTD_MAGIC:
                return f"corrupt: no zstd frame at offset {pos} (bytes {magic!r})"
            desc_b = f.read(1)
            if not desc_b:
                return f"truncated in frame header at offset {pos}"
            desc = desc_b[0]
            single = (desc >> 5) & 1
            fcs_flag = desc >> 6
            header = 1 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3] + (single, 2, 4, 8)[fcs_flag]
            checksum = (desc >> 2) & 1
            pos += 4 + header
            while True:
                if pos + 3 > size:
                    return f"truncated: frame {frames} is cut off at offset {size} of {size}"
                f.seek(pos)
                hdr = int.from_bytes(f.read(3), "little")
                last, btype, bsize = hdr & 1, (hdr >> 1) & 3, hdr >> 3
                if btype == 3:
                    return f"corrupt: reserved block type at offset {pos}"
                pos += 3 + (1 if btype == 1 else bsize)
                if pos > size:
                    return f"truncated: frame {frames} is cut off inside a block (file ends at {size})"
                if last:
                    break
            pos += 4 * checksum
            if pos > size:
                return f"truncated: frame {frames} is missing its checksum"
            frames += 1
    return ""


def _source(path: Path, display: str, split: str, component: str) -> SourceFile | None:
    fmt = format_of(path.name)
    if fmt is None:
        return None
    _sniff(path, *fmt)
    size = path.stat().st_size
    damage = check_zstd_frames(path) if fmt[1] == "zst" and size else ""
    return SourceFile(str(path), display, split, fmt[0], fmt[1], size, component, damage)


def expand_inputs(inputs: Iterable[str], cfg: ReaderConfig | None = None) -> list[SourceFile]:
    """Resolve files, folders, globs and ``hf:`` names to SourceFiles (sorted within each
    input; inputs keep their order). Raises ValueError naming any input that matches nothing
    or whose content contradicts its extension."""
    cfg = cfg or ReaderConfig()
    out: list[SourceFile] = []
    seen: set[str] = set()
    for spec in inputs:
        if spec.startswith("hf:"):
            out.append(_hf_source(spec, cfg))
            continue
        p = Path(spec)
        found: list[SourceFile] = []
        if p.is_dir():
            comp = cfg.default_component or p.resolve().name
            files = _folder_files(p)
            for f in files:
                src = _source(f, f"{p.name}/{f.relative_to(p)}", split_of(f, p), comp)
                if src is not None:
                    found.append(src)
            ignored = len(files) - len(found)
            if ignored:
                log.warning("%s: ignored %d files with unknown extensions", p, ignored)
        elif p.is_file():
            if format_of(p.name) is None:
                raise ValueError(f"{p}: unknown file type; expected one of {', '.join(sorted(_EXTENSIONS))}")
            comp = cfg.default_component or _strip_extensions(p.name)
            src = _source(p, str(p), split_of(p, None), comp)
            assert src is not None
            found.append(src)
        elif any(ch in spec for ch in "*?["):
            for m in sorted(glob.glob(spec, recursive=True)):
                mp = Path(m)
                if mp.is_file() and format_of(mp.name) is not None:
                    comp = cfg.default_component or mp.parent.resolve().name
                    src = _source(mp, m, split_of(mp, None), comp)
                    assert src is not None
                    found.append(src)
        else:
            raise ValueError(f"input {spec!r} does not exist")
        if not found:
            raise ValueError(f"input {spec!r} holds no readable files (.jsonl[.zst|.gz], .parquet, .txt)")
        for src in found:
            key = os.path.realpath(src.path)
            if key in seen:
                continue  # the same file named twice (e.g. a folder and a glob) is read once
            seen.add(key)
            out.append(src)
    return out


def _folder_files(folder: Path) -> list[Path]:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        # A prepared directory: its documents are <split>/*.jsonl.zst (not the rejects log).
        try:
            stage = json.loads(manifest.read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
        if stage == "prepare":
            return sorted(f for s in SPLITS for f in (folder / s).glob("*.jsonl.zst"))
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in names if not n.startswith("."))
    return sorted(files)


def _hf_source(spec: str, cfg: ReaderConfig) -> SourceFile:
    """``hf:NAME[#CONFIG][@SPLIT]``: a Hugging Face dataset, streamed (needs the network)."""
    name, split = spec[3:], "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    ours = "val" if split.startswith("valid") else ("test" if split.startswith("test") else "train")
    comp = cfg.default_component or name.split("#")[0].rsplit("/", 1)[-1]
    return SourceFile(spec, spec, ours, "hf", "", 0, comp)


# ---------------------------------------------------------------- byte streams and lines


def open_stream(src: SourceFile) -> BinaryIO:
    """The decompressed byte stream of a file; ``read(n)`` never returns more than n bytes."""
    if src.compression == "zst":
        fh = open(src.path, "rb")
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            fh, read_size=1 << 20, read_across_frames=True, closefd=True
        )
    if src.compression == "gz":
        return gzip.open(src.path, "rb")  # type: ignore[return-value]
    return open(src.path, "rb")


def estimate_size(src: SourceFile, sample: int = 1 << 20) -> int:
    """Decompressed bytes of a file: exact for plain files, else extrapolated from the
    compression ratio of its first ``sample`` compressed bytes."""
    if not src.compression or src.size == 0:
        return src.size
    with open(src.path, "rb") as f:
        head = f.read(sample)
    try:
        if src.compression == "zst":
            out = zstandard.ZstdDecompressor().decompressobj().decompress(head)
        else:
            out = zlib.decompressobj(wbits=31).decompress(head, 64 * sample)
    except (zstandard.ZstdError, zlib.error):
        return src.size
    return int(src.size * max(1.0, len(out) / max(1, len(head))))


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
        if _LONE_SURROGATE.search(text):
            if self.cfg.on_bad_unicode == "skip":
                return self.reject(number, "lone_surrogate", "text holds UTF-16 surrogates that are not "
                                   "valid Unicode scalar values", raw, comp, nbytes)
            text = _LONE_SURROGATE.sub("\ufffd", text)
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
    stream = open_stream(src)
    try:
        lines = iter_lines(stream, start, end, parser.cfg.max_line_bytes)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
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
    name, split = src.path[3:], "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    name, _, config = name.partition("#")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for i, record in enumerate(ds, start=1):
        yield parser.to_document(dict(record), i, 0)


def read_documents(paths: Iterable[str | Path], cfg: ReaderConfig | None = None) -> Iterator[Document]:
    """Documents of files, folders, globs or a prepared directory, in canonical order.

    Unreadable records are skipped with a warning naming file and line (``pilelm prepare``
    counts them and writes them to its rejects log instead).
    """
    cfg = cfg or ReaderConfig()
    for src in expand_inputs([str(p) for p in paths], cfg):
        for item in iter_source(src, cfg):
            if isinstance(item, Rejected):
                log.warning("skipped %s: %s %s", item.source, item.reason, item.detail)
            else:
                yield item
