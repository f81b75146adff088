"""The prepared directory (``pilelm prepare`` output): its layout, written and read here only.

    PREPARED/<split>/NNNNN.jsonl.zst   kept documents, one ``{"text", "meta"}`` object a line
                                       (the Pile's record shape); file names sorted give the
                                       canonical document order (the input order)
    PREPARED/rejects.jsonl.zst         every dropped record: reason, file:line, preview
    PREPARED/stats.md, *.png           what each step did, per component
    PREPARED/canaries.json             the canaries planted in train (``privacy.canaries=N``)
    PREPARED/.work/                    intermediate files of a run not finished yet
    PREPARED/manifest.json             written last

The splits are ``train``, ``val`` and ``test``; a component is ``meta["pile_set_name"]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from pilelm.core.manifest import MANIFEST, read_manifest
from pilelm.data.document import LONE_SURROGATE, Document

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHARD_SUFFIX = ".jsonl.zst"
REJECTS = "rejects.jsonl.zst"
STATS = "stats.md"
PLOTS = ("lengths.png", "removed.png")
WORK = ".work"
CANARIES = "canaries.json"


def shard_path(prep: str | Path, split: str, index: int) -> Path:
    """Where task ``index`` of ``split`` writes its documents."""
    return Path(prep) / split / f"{index:05d}{SHARD_SUFFIX}"


def split_files(prep: str | Path, split: str) -> list[Path]:
    """A prepared dir's document files of one split, in canonical (name) order."""
    return sorted((Path(prep) / split).glob(f"*{SHARD_SUFFIX}"))


def present_splits(prep: str | Path) -> list[str]:
    """The splits that hold documents, in ``SPLITS`` order."""
    return [s for s in SPLITS if split_files(prep, s)]


def is_prepared(folder: str | Path) -> bool:
    """Whether ``folder`` is a finished ``pilelm prepare`` output."""
    if not (Path(folder) / MANIFEST).is_file():
        return False
    try:
        return read_manifest(folder).get("stage") == "prepare"
    except (OSError, ValueError):
        return False


def document_files(prep: str | Path) -> list[Path]:
    """Every split's document files (not the rejects log), train first."""
    return [f for s in SPLITS for f in split_files(prep, s)]


def output_names() -> tuple[str, ...]:
    """Everything a prepare run puts in its output directory (what ``--overwrite`` clears)."""
    return (*SPLITS, WORK, MANIFEST, REJECTS, STATS, *PLOTS, CANARIES)


def encode_record(text: str, meta: dict[str, Any]) -> bytes:
    """One document as a JSON line."""
    record = {"text": text, "meta": meta}
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates in metadata: escape them
        return json.dumps(record, ensure_ascii=True).encode("ascii") + b"\n"


def _numbered_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a ``.jsonl.zst`` file, streaming; blank lines are skipped."""
    number = 0
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_size=1 << 20) as r:
        rest = b""
        try:
            while chunk := r.read(8 << 20):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    number += 1
                    if line.strip():
                        yield number, line
        except zstandard.ZstdError as e:
            raise ValueError(f"{path}: corrupt compressed data after line {number} ({e}); "
                             "rerun `pilelm prepare` to rewrite it") from e
        if rest.strip():
            yield number + 1, rest


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of one ``.jsonl.zst`` file written with ``encode_record``; a line that is
    not JSON is an error naming the file and line."""
    for number, line in _numbered_lines(path):
        try:
            yield json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not a JSON record ({e}); rerun `pilelm prepare`") from e


class BadRecord(ValueError):
    """A line that is not a document; ``reason`` is a short name for the counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_record(raw: bytes) -> tuple[str, dict[str, Any]]:
    """(text, meta) of one line of a prepared file; raises ``BadRecord`` with reason
    ``invalid_json`` or ``missing_text``. (Text with lone surrogates is valid JSON but not
    valid Unicode: callers find it where they encode the text.)"""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise BadRecord("invalid_json", str(e)) from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise BadRecord("missing_text", "no string field 'text'")
    meta = record.get("meta")
    return text, meta if isinstance(meta, dict) else {}


def iter_documents(files: Iterable[str | Path]) -> Iterator[Document]:
    """The documents of prepared ``files`` in order, ids ``file:line``; a line that is not a
    document (bad JSON, no text, text that is not valid Unicode) is skipped with a warning
    naming the file, line and reason."""
    for path in files:
        for number, line in _numbered_lines(path):
            try:
                text, meta = parse_record(line)
                if LONE_SURROGATE.search(text):
                    raise BadRecord("invalid_unicode", "the text holds lone UTF-16 surrogates")
            except BadRecord as e:
                log.warning("%s:%d: skipped (%s)", path, number, e)
                continue
            yield Document(f"{path}:{number}", text, meta)


def read_split(prep: str | Path, split: str, limit: int = 0) -> Iterator[Document]:
    """The documents of one split of a prepared dir in canonical order (the first ``limit``
    when it is > 0); a split without documents is an error that names the splits there are."""
    files = split_files(prep, split)
    if not files:
        have = ", ".join(present_splits(prep)) or "none"
        raise FileNotFoundError(f"{prep} has no {split} split ({split}/*{SHARD_SUFFIX}); splits here: {have}")
    for i, doc in enumerate(iter_documents(files)):
        if limit and i >= limit:
            return
        yield doc
