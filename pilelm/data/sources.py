"""Input discovery for ``pilelm prepare``: which files to read, in which split, in what format,
and how to cut them into pieces of work.

- Inputs are files, folders (searched recursively, hidden entries skipped), globs or
  ``hf:NAME[#CONFIG][@SPLIT]`` Hugging Face datasets; a prepared directory given as input
  stands for its documents. Each file belongs to a split: a file named ``val*`` /
  ``validation*`` / ``test*`` or inside a folder named ``val`` / ``valid`` / ``validation`` /
  ``test`` is eval data, all else train.
- A file's format comes from its extension; its compression from its first bytes
  (``pilelm.data.decompress``), so gzip or plain JSON lines behind a ``.zst`` name are read as
  what they are (logged, and noted in the manifest). A file that cannot be read as named (a
  ``.parquet`` or ``.txt`` holding something else, an unreadable file) is a clear error before
  any work starts, or with ``reader.on_bad_file=skip`` a named, reasoned skip (``SkippedFile``).
- A damaged ``.zst`` is found here, before reading, by walking the frame and block headers
  (RFC 8878 §3.1): the streaming decompressor returns a cut-off frame's data without an error.
- Big files are cut into pieces (``plan_ranges``): decompressed byte ranges of JSON lines,
  row-group ranges of Parquet; ``pilelm.data.readers`` reads a piece.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pilelm.data.decompress import (
    DEFAULT_MAX_RATIO,
    PARQUET_MAGIC,
    ZSTD_MAGIC,
    content_compression,
    estimate_ratio,
)
from pilelm.data.prepared import document_files, is_prepared

log = logging.getLogger(__name__)

_SPLIT_FILE = re.compile(r"^(val|valid|validation|test)(?![a-z])")
_SPLIT_DIRS = {"val": "val", "valid": "val", "validation": "val", "test": "test"}

# extension -> (format, compression)
_EXTENSIONS: dict[str, tuple[str, str]] = {
    ".jsonl": ("jsonl", ""), ".json": ("jsonl", ""), ".ndjson": ("jsonl", ""),
    ".jsonl.zst": ("jsonl", "zst"), ".json.zst": ("jsonl", "zst"), ".jsonl.zstd": ("jsonl", "zst"),
    ".jsonl.gz": ("jsonl", "gz"), ".json.gz": ("jsonl", "gz"), ".ndjson.gz": ("jsonl", "gz"),
    ".parquet": ("parquet", ""),
    ".txt": ("txt", ""),
}


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
    note: str = ""
    """Set when the content's compression differs from the name's (it is read by content)."""


class BadInputFile(ValueError):
    """An input file that cannot be read as what its name says."""


@dataclass(frozen=True)
class SkippedFile:
    """An input file left out under ``reader.on_bad_file=skip``, and why."""

    path: str
    reason: str


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


_DESCRIBE = {"zst": "zstd-compressed", "gz": "gzip-compressed", "": "plain text"}


def _read_as(path: Path, fmt: str, compression: str) -> tuple[str, str]:
    """(compression to read ``path`` with, a note when it differs from the name's) from the
    file's first bytes; raises BadInputFile when the content cannot be what the name says."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BadInputFile(f"{path}: cannot be read ({e})") from e
    if not head:
        return compression, ""  # empty: nothing to contradict
    actual = content_compression(head)
    if fmt == "jsonl":
        if actual == compression:
            return compression, ""
        note = (f"named like {_DESCRIBE[compression]} data but holds {_DESCRIBE[actual]}; "
                f"read as {_DESCRIBE[actual]}")
        log.warning("%s: %s", path, note)
        return actual, note
    looks = "Parquet" if head == PARQUET_MAGIC else _DESCRIBE[actual]
    expected = "Parquet" if fmt == "parquet" else "plain text"
    if looks != expected:
        raise BadInputFile(
            f"{path}: the file is named like {expected} data but its content is {looks} "
            f"(first bytes {head!r}); rename it to match its content or re-export it"
        )
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path).metadata  # noqa: B018 - reading the footer is the check
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
            raise BadInputFile(f"{path}: not a readable Parquet file ({e})") from e
    return compression, ""


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


def _source(path: Path, display: str, split: str, component: str,
            skipped: list[SkippedFile] | None) -> SourceFile | None:
    """The SourceFile of a file with a known extension; None for other files, and for a bad
    file when ``skipped`` collects those (else BadInputFile is raised)."""
    fmt = format_of(path.name)
    if fmt is None:
        return None
    try:
        compression, note = _read_as(path, *fmt)
    except BadInputFile as e:
        if skipped is None:
            raise
        log.warning("skipping %s (reader.on_bad_file=skip)", e)
        skipped.append(SkippedFile(display, str(e)))
        return None
    size = path.stat().st_size
    damage = check_zstd_frames(path) if compression == "zst" and size else ""
    return SourceFile(str(path), display, split, fmt[0], compression, size, component, damage, note)


def expand_inputs(inputs: Iterable[str], default_component: str | None = None,
                  skipped: list[SkippedFile] | None = None) -> list[SourceFile]:
    """Resolve files, folders, globs and ``hf:`` names to SourceFiles (sorted within each
    input; inputs keep their order). ``default_component``: the component of records that
    name none (None: the input's own name). Raises ValueError naming any input that matches
    nothing; a file that cannot be read as named raises BadInputFile, or, when ``skipped`` is
    given, is appended there and left out."""
    out: list[SourceFile] = []
    seen: set[str] = set()
    for spec in inputs:
        if spec.startswith("hf:"):
            out.append(_hf_source(spec, default_component))
            continue
        p = Path(spec)
        found: list[SourceFile] = []
        n_skipped = len(skipped) if skipped is not None else 0
        if p.is_dir():
            comp = default_component or p.resolve().name
            files = _folder_files(p)
            for f in files:
                src = _source(f, f"{p.name}/{f.relative_to(p)}", split_of(f, p), comp, skipped)
                if src is not None:
                    found.append(src)
            ignored = len(files) - len(found) - ((len(skipped) - n_skipped) if skipped is not None else 0)
            if ignored:
                log.warning("%s: ignored %d files with unknown extensions", p, ignored)
        elif p.is_file():
            if format_of(p.name) is None:
                raise ValueError(f"{p}: unknown file type; expected one of {', '.join(sorted(_EXTENSIONS))}")
            comp = default_component or _strip_extensions(p.name)
            src = _source(p, str(p), split_of(p, None), comp, skipped)
            if src is not None:
                found.append(src)
        elif any(ch in spec for ch in "*?["):
            for m in sorted(glob.glob(spec, recursive=True)):
                mp = Path(m)
                if mp.is_file() and format_of(mp.name) is not None:
                    comp = default_component or mp.parent.resolve().name
                    src = _source(mp, m, split_of(mp, None), comp, skipped)
                    if src is not None:
                        found.append(src)
        else:
            raise ValueError(f"input {spec!r} does not exist")
        if not found and (skipped is None or len(skipped) == n_skipped):
            raise ValueError(f"input {spec!r} holds no readable files (.jsonl[.zst|.gz], .parquet, .txt)")
        for src in found:
            key = os.path.realpath(src.path)
            if key in seen:
                continue  # the same file named twice (e.g. a folder and a glob) is read once
            seen.add(key)
            out.append(src)
    return out


def _folder_files(folder: Path) -> list[Path]:
    if is_prepared(folder):  # its documents, not its rejects log or report
        return document_files(folder)
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in names if not n.startswith("."))
    return sorted(files)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[#CONFIG][@SPLIT]`` -> (name, config or None, split; train when not given)."""
    name, split = spec[3:], "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    name, _, config = name.partition("#")
    return name, config or None, split


def _hf_source(spec: str, default_component: str | None) -> SourceFile:
    """A Hugging Face dataset, streamed (needs the network)."""
    name, _, split = parse_hf_spec(spec)
    ours = "val" if split.startswith("valid") else ("test" if split.startswith("test") else "train")
    comp = default_component or name.rsplit("/", 1)[-1]
    return SourceFile(spec, spec, ours, "hf", "", 0, comp)


def estimate_size(src: SourceFile, sample: int = 1 << 20, max_ratio: float = DEFAULT_MAX_RATIO) -> int:
    """Decompressed bytes of a file: exact for plain files, else extrapolated from the
    compression ratio of its first ``sample`` compressed bytes (decompressed in bounded
    chunks, the ratio capped at ``max_ratio``: a hostile file cannot make planning expand it)."""
    if not src.compression or src.size == 0:
        return src.size
    return int(src.size * estimate_ratio(src.path, src.compression, sample, max_ratio))


def plan_ranges(src: SourceFile, task_bytes: int) -> list[tuple[int, int | None, int]]:
    """(start, end, size) pieces of one source of about ``task_bytes`` each: decompressed byte
    ranges of JSON lines (sizes estimated for compressed files), row-group ranges of Parquet;
    other formats are one piece."""
    if src.format == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(src.path).metadata
        out: list[tuple[int, int | None, int]] = []
        start, size = 0, 0
        for g in range(md.num_row_groups):
            size += md.row_group(g).total_byte_size
            if size >= task_bytes:
                out.append((start, g + 1, size))
                start, size = g + 1, 0
        if size or not out:
            out.append((start, None, size))
        return out
    if src.format != "jsonl":
        return [(0, None, src.size)]
    total = estimate_size(src) if src.size > task_bytes // 16 else src.size * (4 if src.compression else 1)
    n = max(1, round(total / task_bytes))
    if n == 1:
        return [(0, None, total)]
    step = -(-total // n)
    return [(k * step, None if k == n - 1 else (k + 1) * step, step) for k in range(n)]
