"""Tagged sentences for token classification: CoNLL-2003 files and JSONL ``{tokens, tags}``.

CoNLL-2003 (Tjong Kim Sang & De Meulder 2003): one token per line, whitespace-separated
columns (token first, the tag in ``tag_column``, by default the last), a blank line between
sentences, ``-DOCSTART-`` lines between documents. Every line of a file must have the same
number of columns; a line that does not is an error naming the file and line.

Tag schemes: BIO (IOB2: an entity starts with ``B-X`` and continues with ``I-X``) and BIOES
(adds ``E-X`` for the last token and ``S-X`` for a one-token entity). A sequence that breaks
its scheme (``I-X`` after ``O``, ``E-X`` without a start) is an error naming the file and line
of the token, not a silent repair: the usual cause is a file in IOB1 or another scheme.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pilelm.finetune.records import DataError, iter_json_records, text_lines

Scheme = Literal["auto", "bio", "bioes"]


@dataclass(frozen=True)
class TaggedSentence:
    tokens: list[str]
    tags: list[str]
    where: list[str]
    """``file:line`` of each token (for JSONL, the record's line for every token)."""


def read_conll(path: str | Path, tag_column: int = -1) -> list[TaggedSentence]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    where: list[str] = []
    width = 0
    first_line = 0

    def close() -> None:
        if tokens:
            sentences.append(TaggedSentence(list(tokens), list(tags), list(where)))
            tokens.clear(), tags.clear(), where.clear()

    for lineno, line in text_lines(path):
        cols = line.split()
        if not cols:
            close()
            continue
        if cols[0] == "-DOCSTART-":
            close()
            continue
        if not width:
            width, first_line = len(cols), lineno
            if width < 2:
                raise DataError(f"{path}:{lineno}: one column; CoNLL lines are `TOKEN ... TAG`")
        elif len(cols) != width:
            raise DataError(f"{path}:{lineno}: {len(cols)} columns, but line {first_line} has {width}; "
                            "every token line of a CoNLL file needs the same columns")
        tokens.append(cols[0])
        tags.append(cols[tag_column])
        where.append(f"{path}:{lineno}")
    close()
    return sentences


def read_tagged_jsonl(path: str | Path, tokens_key: str = "tokens", tags_key: str = "tags") -> list[TaggedSentence]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    out = []
    for where, record in iter_json_records(path):
        tokens, tags = record.get(tokens_key), record.get(tags_key)
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{where}: needs lists {tokens_key!r} and {tags_key!r} (have {', '.join(record)})")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        for key, values in ((tokens_key, tokens), (tags_key, tags)):
            bad = next((v for v in values if not isinstance(v, str)), None)
            if bad is not None:
                raise DataError(f"{where}: {key!r} holds {json.dumps(bad)[:80]} ({type(bad).__name__}); every "
                                "token and tag must be a string: fix the file")
        if tokens:
            out.append(TaggedSentence(list(tokens), list(tags), [where] * len(tokens)))
    return out


def read_tagged(path: str | Path) -> list[TaggedSentence]:
    """CoNLL (any suffix but .jsonl / .json) or JSONL tagged sentences."""
    name = Path(path).name
    return read_tagged_jsonl(path) if name.endswith((".jsonl", ".json", ".jsonl.zst")) else read_conll(path)


def detect_scheme(sentences: list[TaggedSentence]) -> Literal["bio", "bioes"]:
    prefixes = {tag[:2] for s in sentences for tag in s.tags}
    return "bioes" if prefixes & {"E-", "S-"} else "bio"


def check_scheme(sentence: TaggedSentence, scheme: Literal["bio", "bioes"]) -> None:
    """Raise DataError at the first tag that breaks ``scheme``."""
    allowed = {"B", "I"} | ({"E", "S"} if scheme == "bioes" else set())
    open_type: str | None = None  # the entity type an I-/E- tag may continue
    for tag, where in zip(sentence.tags, sentence.where, strict=True):
        if tag == "O":
            if scheme == "bioes" and open_type is not None:
                raise DataError(f"{where}: `O` inside an entity of type {open_type}; BIOES ends one with E-")
            open_type = None
            continue
        prefix, _, kind = tag.partition("-")
        if prefix not in allowed or not kind:
            raise DataError(f"{where}: tag {tag!r} is not {scheme.upper()} (expected O or "
                            f"{'/'.join(sorted(allowed))}-TYPE); set data.scheme or convert the file")
        if prefix in ("I", "E") and open_type != kind:
            raise DataError(f"{where}: {tag} does not continue an entity (previous tag opens "
                            f"{open_type or 'nothing'}); not valid {scheme.upper()}: in IOB1 files convert "
                            "entity-initial I- tags to B-")
        if scheme == "bioes" and prefix in ("B", "S") and open_type is not None:
            raise DataError(f"{where}: {tag} starts an entity before {open_type} was closed with E-")
        open_type = kind if prefix in ("B", "I") else None
    if scheme == "bioes" and open_type is not None:
        raise DataError(f"{sentence.where[-1]}: the sentence ends inside an entity of type {open_type}")


def iter_checked(sentences: list[TaggedSentence], scheme: Scheme) -> Iterator[TaggedSentence]:
    chosen = detect_scheme(sentences) if scheme == "auto" else scheme
    for s in sentences:
        check_scheme(s, chosen)
        yield s
