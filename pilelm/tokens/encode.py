"""Encoding prepared documents fast: raw JSON lines cut into batches, parsed, encoded and
handed back in input order, with reading, parsing and encoding overlapped.

Two ways to run, picked by the encoder (``pilelm.tokens.encoders``):

- **One process** (gigatoken or fastokens, whose batch calls run on their own threads outside
  the GIL; or ``workers=1``): a reader thread decompresses a split's files in canonical order, cuts the
  stream into batches of whole lines (``batch_bytes`` each, bytes.find/count only) and parses
  them (orjson), up to ``depth`` batches ahead (``read_ahead``); the main thread encodes each
  batch of texts in one call and appends the ids, in input order, to the output files. No
  texts or ids cross a process boundary, and the main thread does no per-document Python work
  beyond building the per-document arrays.
- **A pool of processes** (tiktoken and tokenizers, ``workers`` > 1): the reader thread cuts
  raw batches; worker processes parse and encode them; the main thread hands batches out and
  appends the results in input order. At most ``2 * workers + 1`` batches are in flight.
  Workers start by ``pilelm.core.workers``' policy: forked when safe, so they begin with the
  tokenizer already loaded.

Either way memory stays bounded whatever the corpus size.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import orjson

from pilelm.core.workers import process_pool
from pilelm.data.document import COMPONENT_KEY
from pilelm.data.prepared import BadRecord, parse_record
from pilelm.tokens.encoders import flatten, one_thread_per_process
from pilelm.tokens.tokenizer import PileTokenizer, load_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a worker that is not a fork imports up front (pilelm.core.workers).
PRELOAD = ("pilelm.tokens.encode",)


# ---------------------------------------------------------------- batches of raw lines


@dataclass
class LineBatch:
    """Whole lines of one file, as one blob: lines ``first_line .. first_line + count - 1``."""

    file_index: int
    first_line: int
    count: int
    data: bytes
    """The lines, each ending with a newline (blank lines included; workers skip them)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Lines the reader dropped (too long), by reason."""

    @property
    def last_line(self) -> int:
        return self.first_line + self.count - 1


def count_newlines(data: bytes) -> int:
    # numpy's vectorised compare counts about 5x faster than bytes.count's byte loop.
    return int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 10))


def iter_line_batches(files: list[Path], batch_bytes: int, start: tuple[int, int] = (0, 0),
                      max_line_bytes: int = 64 << 20) -> Iterator[LineBatch]:
    """Batches of about ``batch_bytes`` of whole lines of ``files`` in order, never spanning
    two files, starting after line ``start[1]`` of file ``start[0]``.

    Lines are found with bytes.rfind and counted with numpy on decompressed chunks (no
    per-line Python work in this thread, which shares the cores with the encoders); a line over ``max_line_bytes`` is
    dropped (counted) as it streams by, so memory stays bounded.
    """
    read_size = max(1, min(batch_bytes, 8 << 20))
    first_file, skip_to = start
    for fi in range(first_file, len(files)):
        lines = WholeLines(files[fi], skip_to if fi == first_file else 0, max_line_bytes)
        yield from _file_batches(fi, lines, batch_bytes, read_size)


def _file_batches(fi: int, lines: WholeLines, batch_bytes: int, read_size: int) -> Iterator[LineBatch]:
    """The blocks of one file gathered into batches of about ``batch_bytes``."""
    import zstandard

    from pilelm.data.readers import open_stream
    from pilelm.data.sources import SourceFile

    path = lines.path
    src = SourceFile(str(path), path.name, "", "jsonl", "zst" if path.suffix == ".zst" else "",
                     path.stat().st_size, "")
    stream = open_stream(src)
    parts: list[bytes] = []
    part_lines = part_bytes = 0
    part_first = 1
    try:
        for first, block, n in lines.blocks(stream, read_size):
            if not parts:
                part_first = first
            parts.append(block)
            part_lines += n
            part_bytes += len(block)
            if part_bytes >= batch_bytes:
                yield LineBatch(fi, part_first, part_lines, b"".join(parts), lines.take_skipped())
                parts, part_lines, part_bytes = [], 0, 0
    except (zstandard.ZstdError, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt compressed data near line {lines.line} ({e}); "
                         "rerun `pilelm prepare` to rewrite the prepared dir") from e
    finally:
        stream.close()
    skipped = lines.take_skipped()
    if parts or skipped:
        yield LineBatch(fi, part_first if parts else lines.line, part_lines, b"".join(parts), skipped)


class WholeLines:
    """Blocks of whole lines read from one file's stream, numbered, the lines up to ``skip``
    left out (a resumed run) and a line over ``max_line_bytes`` dropped and counted."""

    def __init__(self, path: Path, skip: int, max_line_bytes: int):
        self.path, self.skip, self.max_line_bytes = path, skip, max_line_bytes
        self.line = 1  # number of the line that starts the next block
        self.skipped: Counter[str] = Counter()

    def take_skipped(self) -> Counter[str]:
        """The lines dropped since the last call, by reason."""
        skipped, self.skipped = self.skipped, Counter()
        return skipped

    def _drop(self, line: int) -> None:
        self.skipped["line_too_long"] += 1
        log.warning("%s:%d: skipped, over %d bytes (the line limit)", self.path, line, self.max_line_bytes)

    def blocks(self, stream: BinaryIO, read_size: int) -> Iterator[tuple[int, bytes, int]]:
        """(number of its first line, block of whole lines, line count) per chunk read."""
        carry = b""  # the unfinished line at the end of what was read
        too_long = False  # inside a line over the limit: drop until its newline
        while True:
            chunk = stream.read(read_size)
            if not chunk:
                if carry and not too_long:
                    chunk = b"\n"  # a last line without newline
                else:
                    break
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n")
            if too_long:
                if cut < 0:
                    continue
                data, too_long = data[data.find(b"\n") + 1 :], False
                self.line += 1
                cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                if len(carry) > self.max_line_bytes:
                    if self.line > self.skip:  # (a resumed run counted it already)
                        self._drop(self.line)
                    carry, too_long = b"", True
                continue
            block, carry = data[: cut + 1], data[cut + 1 :]
            n = count_newlines(block)
            if self.line + n - 1 <= self.skip:  # all before the resume point
                self.line += n
                continue
            if self.line <= self.skip:  # cut off the lines before the resume point
                off = -1
                for _ in range(self.skip - self.line + 1):
                    off = block.find(b"\n", off + 1)
                block, n, self.line = block[off + 1 :], n - (self.skip - self.line + 1), self.skip + 1
            if len(block) > self.max_line_bytes:  # it may hold a whole line over the limit
                block = self._blank_long_lines(block)
            yield self.line, block, n
            self.line += n

    def _blank_long_lines(self, block: bytes) -> bytes:
        pieces = block.split(b"\n")
        for i, piece in enumerate(pieces):
            if len(piece) > self.max_line_bytes:
                self._drop(self.line + i)
                pieces[i] = b""  # a blank line: the numbering stays true
        return b"\n".join(pieces)


@dataclass
class _End:
    error: BaseException | None = None


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by a daemon thread up to ``depth`` ahead of the consumer.

    So reading and decompressing (zstandard releases the GIL) run while this thread waits
    for encoded batches or writes them: neither waits on the other while the queue is
    neither empty nor full. An error in ``items`` is raised here; a consumer that stops
    early stops the thread.
    """
    q: queue.Queue[T | _End] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: T | _End) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_End())
        except BaseException as e:  # handed to the consumer, raised there
            put(_End(e))

    thread = threading.Thread(target=produce, name="pilelm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- parsing and encoding


@dataclass
class EncodedBatch:
    tokens: np.ndarray
    sizes: np.ndarray
    nbytes: np.ndarray
    components: list[str]
    """Component name of each document."""
    skipped: Counter[str]


_WORKER_TOKENIZER: PileTokenizer | None = None


def _init_worker(tokenizer_path: str, encoder: str) -> None:
    global _WORKER_TOKENIZER
    # One process per core already: keep the encoders' own thread pools out of the way.
    one_thread_per_process()
    if _WORKER_TOKENIZER is None:  # not a fork (a forked worker inherits the parent's)
        _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, encoder=encoder)


def _encode_in_worker(data: bytes, first_line: int, source: str, eod_id: int, dtype: str) -> EncodedBatch:
    assert _WORKER_TOKENIZER is not None, "worker was not initialised"
    return encode_lines(_WORKER_TOKENIZER, data, first_line, source, eod_id, np.dtype(dtype))


def _utf8_length(text: str) -> int:
    # An ASCII str knows it is ASCII (a flag, no scan): its length is its UTF-8 length.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def text_and_component(raw: bytes) -> tuple[str, str]:
    """(text, component name) of one prepared JSON line, exactly as ``parse_record`` reads it.

    orjson parses it (2-3x the standard library's speed: on minipile, 0.0009 against 0.0019
    CPU-seconds per MB); whatever orjson rejects or reads differently goes to ``parse_record``,
    which decides: lone surrogates, NaN and a BOM (json accepts them, orjson does not), and a
    component that is not a string (orjson turns integers over 64 bits into floats).
    """
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if type(record) is dict:
        text, meta = record.get("text"), record.get("meta")
        component = meta.get(COMPONENT_KEY, "") if type(meta) is dict else ""
        if type(text) is str and type(component) is str:
            return text, component
    text, meta = parse_record(raw)  # raises BadRecord for what is not a document
    return text, str(meta.get(COMPONENT_KEY, ""))


@dataclass
class ParsedLines:
    """The documents of a batch of lines, parsed, not yet encoded."""

    texts: list[str]
    components: list[str]
    """Component name of each document."""
    lines: list[int]
    """Line number of each document (for messages)."""
    nbytes: list[int]
    """UTF-8 bytes of each text."""
    skipped: Counter[str]


def parse_lines(data: bytes, first_line: int, source: str) -> ParsedLines:
    """Parse prepared JSON lines (``data``, numbered from ``first_line``); blank lines are
    passed over, bad ones (not JSON, no text, text that is not valid Unicode) skipped,
    counted by reason and logged with ``source:line``."""
    texts: list[str] = []
    comps: list[str] = []
    kept: list[int] = []
    nbytes: list[int] = []
    skipped: Counter[str] = Counter()
    for number, raw in enumerate(data.split(b"\n")[:-1], start=first_line):
        if not raw or raw.isspace():  # (isspace stops at the first other byte; strip copies)
            continue
        try:
            text, component = text_and_component(raw)
            size = _utf8_length(text)
        except BadRecord as e:
            skipped[e.reason] += 1
            log.warning("%s:%d: skipped (%s)", source, number, e)
            continue
        except UnicodeEncodeError as e:  # lone surrogates: valid JSON, not valid Unicode
            skipped["invalid_unicode"] += 1
            log.warning("%s:%d: skipped (invalid_unicode: %s)", source, number, e)
            continue
        texts.append(text)
        comps.append(component)
        kept.append(number)
        nbytes.append(size)
    return ParsedLines(texts, comps, kept, nbytes, skipped)


def encode_parsed(tok: PileTokenizer, parsed: ParsedLines, source: str, eod_id: int, dtype: np.dtype
                  ) -> EncodedBatch:
    """Encode parsed documents, each followed by ``eod_id``, in one batch call to the encoder;
    a text an encoder refuses is skipped and counted (``parse_lines`` already skipped those
    with lone surrogates: this is the net for anything else)."""
    texts, comps, nbytes, skipped = parsed.texts, parsed.components, parsed.nbytes, parsed.skipped
    try:
        ids, offsets = tok.encode_flat(texts)
    except (UnicodeEncodeError, TypeError):
        # Text that is not valid Unicode (JSON allows lone surrogates, no tokenizer does):
        # find the culprits one by one, skip them with a reason.
        parts, good = [], []
        for i, text in enumerate(texts):
            try:
                parts.append(tok.encode_to_numpy(text))
                good.append(i)
            except (UnicodeEncodeError, TypeError) as e:
                skipped["invalid_unicode"] += 1
                log.warning("%s:%d: skipped (invalid_unicode: %s)", source, parsed.lines[i], e)
        comps, nbytes = [comps[i] for i in good], [nbytes[i] for i in good]
        ids, offsets = flatten(parts)
    if len(ids) and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{source}: token id {int(ids.max())} does not fit {dtype}")
    # Each document's ids, then one EOD: insert the EOD at every document's end offset.
    tokens = np.insert(ids.astype(dtype), offsets[1:], eod_id)
    sizes = (np.diff(offsets) + 1).astype(np.int32)
    return EncodedBatch(tokens, sizes, np.array(nbytes, dtype=np.int64), comps, skipped)


def encode_lines(tok: PileTokenizer, data: bytes, first_line: int, source: str, eod_id: int,
                 dtype: np.dtype) -> EncodedBatch:
    """Parse prepared JSON lines (``data``, numbered from ``first_line``) and encode each
    document followed by ``eod_id``; bad lines are skipped and counted by reason."""
    return encode_parsed(tok, parse_lines(data, first_line, source), source, eod_id, dtype)


class BatchEncoder:
    """Encodes batches in order: in this process (``workers`` = 1) or over a pool of
    ``workers`` processes, forked from this one when ``inherit`` and safe."""

    def __init__(self, tok: PileTokenizer, tokenizer_path: Path, workers: int, inherit: bool = True):
        self.tok = tok
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            global _WORKER_TOKENIZER
            _WORKER_TOKENIZER = tok  # what forked workers start with; others load it
            try:
                self.pool = process_pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), tok.backend),
                                         inherit=inherit, preload=PRELOAD, warm_up=True)
            finally:
                _WORKER_TOKENIZER = None

    def map(self, batches: Iterator[LineBatch], files: list[Path], eod_id: int, dtype: np.dtype,
            depth: int = 0) -> Iterator[tuple[LineBatch, EncodedBatch]]:
        """(batch, its encoding) in input order; ``batches`` is read (and, in one process,
        parsed) in a thread of its own, up to ``depth`` batches ahead (0: ``workers + 2``)."""
        depth = depth or self.workers + 2
        if self.pool is None:
            for b, parsed in read_ahead(_parse_batches(batches, files), depth):
                yield b, encode_parsed(self.tok, parsed, str(files[b.file_index]), eod_id, dtype)
            return
        pending: collections.deque[tuple[LineBatch, Future[EncodedBatch]]] = collections.deque()
        limit = 2 * self.workers + 1
        for b in read_ahead(batches, depth):
            pending.append((b, self.pool.submit(_encode_in_worker, b.data, b.first_line,
                                                str(files[b.file_index]), eod_id, dtype.name)))
            b.data = b""  # the worker has its copy; keep only the position here
            while len(pending) >= limit:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _parse_batches(batches: Iterator[LineBatch], files: list[Path]) -> Iterator[tuple[LineBatch, ParsedLines]]:
    for b in batches:
        parsed = parse_lines(b.data, b.first_line, str(files[b.file_index]))
        b.data = b""  # parsed: keep only the position
        yield b, parsed
