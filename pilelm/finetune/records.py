"""Labelled text records from users' files: JSONL (plain or .zst), CSV and Parquet.

A record is a text and a label, each found by a (dotted, for JSON) column name, and the place
it came from (``file:line``, or ``file:row N`` for Parquet) so every error and skip can name it.
A missing column is an error naming the file and line; an empty text is a counted skip
(reason ``empty_text``), the documented behaviour, since scraped sets often hold a few.
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


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    if path.name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
            yield from enumerate(io.TextIOWrapper(r, encoding="utf-8"), start=1)
    else:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)


def iter_json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) of each non-blank line of a JSONL file; bad JSON is an error."""
    for lineno, line in _jsonl_lines(path):
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
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", dict(row)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {i}", row
    else:
        raise DataError(f"{path}: unknown format; labelled data must be one of {', '.join(SUFFIXES)}")


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
        if not str(text).strip():
            if skips is not None:
                skips["empty_text"] += 1
            log.debug("%s: empty text skipped", where)
            continue
        out.append(TextRecord(str(text), str(label), where))
    return out
