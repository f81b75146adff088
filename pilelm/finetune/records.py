"""Labelled text records from users' files: JSONL (plain or .zst), CSV and Parquet.

A record is a text and a label, each found by a (dotted, for JSON) column name, and the place
it came from (``file:line``, or ``file:row N`` for Parquet) so every error and skip can name it.
A missing column is an error naming the file and line; an empty text is a counted skip
(reason ``empty_text``), the documented behaviour, since scraped sets often hold a few.
Nothing is silently coerced: a text must be a string and a label a string or an integer (a
list, number or null is refused, and so is a data set mixing ``1`` and ``"1"``, which would be
one class); a CSV row with more or fewer fields than its header, and bytes that are not UTF-8,
are errors naming the file and line. A byte-order mark before the first line is ignored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pilelm.data.readers import get_field

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Labelled data that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class TextRecord:
    text: str
    label: str
    where: str
    """``file:line`` of the record (``file:row N`` for Parquet)."""
    label_kind: str = "str"
    """``str`` or ``int``: what the file's label was before it became ``label``."""


BOM = "\ufeff"


def not_utf8(where: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line); "
                     "re-save the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 (a BOM before the first dropped)."""
    with open(path, "rb") as raw:
        f: io.BufferedIOBase = raw
        if path.name.endswith(".zst"):
            import zstandard

            f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # type: ignore[arg-type]
        for lineno, data in enumerate(f, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(f"{path}:{lineno}", e) from None
            yield lineno, line.removeprefix(BOM) if lineno == 1 else line


def iter_json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) of each non-blank line of a JSONL file; bad JSON is an error."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _iter_rows(path: Path) -> Iterator[tuple[str, dict]]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.zst", ".json")):
        yield from iter_json_records(path)
    elif name.endswith(".csv"):
        yield from _csv_rows(path)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {i}", row
    else:
        raise DataError(f"{path}: unknown format; labelled data must be one of {', '.join(SUFFIXES)}")


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) of a CSV file with a header; a row must have the header's width."""
    reader = csv.reader(line for _, line in text_lines(path))  # UTF-8 checked per line, BOM dropped
    header: list[str] | None = None
    for fields in reader:
        where = f"{path}:{reader.line_num}"
        if header is None:
            header = fields
        elif fields and len(fields) != len(header):
            raise DataError(f"{where}: {len(fields)} fields, but the header has {len(header)} "
                            f"({', '.join(header)}); quote fields that contain commas")
        elif fields:
            yield where, dict(zip(header, fields, strict=True))


def _scalar(where: str, column: str, value: object, what: str, integers: bool = False) -> str:
    """``value`` as a string when it is a string (or, with ``integers``, an int); else refused."""
    if isinstance(value, str) or (integers and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    allowed = "a string or an integer" if integers else "a string"
    raise DataError(f"{where}: {what} {column!r} is {json.dumps(value)[:80]} ({type(value).__name__}); it must be "
                    f"{allowed}: fix the file")


def require_one_label_kind(records: list[TextRecord]) -> None:
    """Refuse labels that mix strings and integers: ``1`` and ``"1"`` would be one class."""
    first: dict[str, TextRecord] = {}
    for r in records:
        first.setdefault(r.label_kind, r)
    if len(first) > 1:
        s, i = first["str"], first["int"]
        raise DataError(f"labels mix strings ({s.where}: {s.label!r}) and integers ({i.where}: {i.label}); "
                        "write every label the same way")


def read_text_records(path: str | Path, text_column: str, label_column: str,
                      skips: Counter[str] | None = None) -> list[TextRecord]:
    """Every (text, label) record of one file; empty texts are skipped and counted in ``skips``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    out = []
    for where, row in _iter_rows(path):
        text, label = get_field(row, text_column), get_field(row, label_column)
        for column, value in ((text_column, text), (label_column, label)):
            if value is None:
                raise DataError(f"{where}: no {column!r} column (have {', '.join(map(str, row))}); "
                                f"set --text-column / --label-column to the names your file uses")
        text = _scalar(where, text_column, text, "text")
        if not text.strip():
            if skips is not None:
                skips["empty_text"] += 1
            log.debug("%s: empty text skipped", where)
            continue
        kind = "int" if isinstance(label, int) else "str"
        out.append(TextRecord(text, _scalar(where, label_column, label, "label", integers=True), where, kind))
    return out
