"""The four kinds of task of ``pilelm prepare`` (see ``pilelm.data.pipeline``): clean, dedup,
decontamination index and count, write. Each writes its outputs atomically and a completion
marker last, so the executor can skip finished ones on a rerun.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from pilelm.core.atomic import atomic_write_bytes, atomic_write_json
from pilelm.data.decontam import (
    IGNORED,
    NgramIndex,
    build_index,
    decontaminate,
    frequent_ngrams,
    matched_ngrams,
)
from pilelm.data.dedup import document_keys, find_duplicates, permutations
from pilelm.data.document import Document
from pilelm.data.filters import Cleaner
from pilelm.data.pii import PiiScrubber
from pilelm.data.plan import PrepareJob, Task
from pilelm.data.prepared import encode_record, iter_records, shard_path
from pilelm.data.readers import Rejected, iter_source, read_documents
from pilelm.data.stats import RejectsLog, TaskStats
from pilelm.data.words import tokenize

BATCH_BYTES = 4 << 20
UNREADABLE = "(unreadable)"
# The step a drop reason belongs to (for "what each step removed").
DEDUP_REASONS = {1: "exact_duplicate", 2: "near_duplicate"}


def _zstd_writer(buf: io.BytesIO, level: int) -> Any:
    return zstandard.ZstdCompressor(level=level).stream_writer(buf, closefd=False)


def _iter_task_items(job: PrepareJob, task: Task) -> Iterator[Document | Rejected]:
    for piece in task.pieces:
        yield from iter_source(job.sources[piece.source], job.cfg.reader, piece.start, piece.end)


# ---------------------------------------------------------------- stage 1: clean


def clean_task(job: PrepareJob, task: Task) -> None:
    cfg = job.cfg
    stats = TaskStats()
    rejects = RejectsLog(job.clean_path(task, "rejects.zst"))
    cleaner = Cleaner(cfg.filters)
    scrubber = PiiScrubber(cfg.pii) if cfg.pii.enabled else None
    need_keys = cfg.dedup.exact or cfg.dedup.minhash
    perms = permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    docs_buf = io.BytesIO()
    docs_out = _zstd_writer(docs_buf, 1)
    ids_buf = io.BytesIO()
    ids_out = _zstd_writer(ids_buf, 1)
    exact_parts: list[np.ndarray] = []
    band_parts: list[np.ndarray] = []

    def drop(doc: Document, reason: str, detail: str) -> None:
        n = len(doc.text.encode("utf-8", "replace"))
        stats.dropped(doc.component, reason, n)
        rejects.write(reason, doc.id, task.split, doc.component, n, detail, doc.text[:120])

    def edited(doc: Document, step: str, removed: int) -> None:
        stats.edited(doc.component, step, removed)

    def flush(batch: list[Document]) -> None:
        kept = cleaner(batch, drop, edited)
        if scrubber is not None:
            for doc in kept:
                if doc.component in cfg.pii.skip:
                    continue
                new, counts = scrubber.scrub(doc.text)
                if counts:
                    edited(doc, "pii", len(doc.text.encode()) - len(new.encode()))
                    doc.note_change("pii", counts)
                    stats.add_pii(counts)
                    doc.text = new
        if not kept:
            return
        enc = [d.text.encode("utf-8") for d in kept]
        if need_keys:
            exact, bands = document_keys(tokenize(enc), enc, cfg.dedup, perms)
            exact_parts.append(exact)
            band_parts.append(bands)
        for doc in kept:
            docs_out.write(encode_record(doc.text, doc.meta))
            ids_out.write(doc.id.encode("utf-8", "replace") + b"\n")

    batch: list[Document] = []
    size = 0
    for item in _iter_task_items(job, task):
        if isinstance(item, Rejected):
            comp = item.component or UNREADABLE
            stats.seen(comp, item.nbytes, item.nbytes)
            stats.dropped(comp, item.reason, item.nbytes)
            rejects.write(item.reason, item.source, task.split, comp, item.nbytes, item.detail, item.preview)
            continue
        n = len(item.text.encode("utf-8")) if not item.text.isascii() else len(item.text)
        stats.seen(item.component, n, len(item.text))
        batch.append(item)
        size += n
        if size >= BATCH_BYTES:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    docs_out.flush(zstandard.FLUSH_FRAME)
    ids_out.flush(zstandard.FLUSH_FRAME)
    n_bands = cfg.dedup.bands if cfg.dedup.minhash else 0
    exact = np.concatenate(exact_parts) if exact_parts else np.zeros((0, 2), dtype=np.uint64)
    bands = np.concatenate(band_parts, axis=1) if band_parts else np.zeros((n_bands, 0), dtype=np.uint64)
    keys = io.BytesIO()
    np.savez(keys, exact=exact, bands=bands)
    atomic_write_bytes(job.clean_path(task, "docs.jsonl.zst"), docs_buf.getvalue())
    atomic_write_bytes(job.clean_path(task, "ids.zst"), ids_buf.getvalue())
    atomic_write_bytes(job.clean_path(task, "keys.npz"), keys.getvalue())
    atomic_write_bytes(job.clean_path(task, "rejects.zst"), rejects.getvalue())
    atomic_write_json(job.clean_path(task, "done.json"), stats.to_json())


# ---------------------------------------------------------------- stage 2: dedup


def dedup_task(job: PrepareJob, split: str) -> None:
    tasks = job.split_tasks(split)
    files = [job.clean_path(t, "keys.npz") for t in tasks]
    res = find_duplicates(files, job.cfg.dedup)
    counts = []
    for f in files:
        with np.load(f) as z:
            counts.append(int(z["exact"].shape[0]))
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    # ids of the documents kept in place of dropped ones, for the rejects log
    needed = np.unique(res.representative[res.reason > 0])
    rep_ids: dict[str, str] = {}
    owner = np.searchsorted(offsets, needed, side="right") - 1
    for t in np.unique(owner):
        want = set((needed[owner == t] - offsets[t]).tolist())
        ids = _read_ids(job.clean_path(tasks[int(t)], "ids.zst"))
        for i in want:
            rep_ids[str(int(offsets[t] + i))] = ids[i]
    dd = job.work / "dedup"
    buf = io.BytesIO()
    np.savez(buf, reason=res.reason, representative=res.representative, offsets=offsets)
    atomic_write_bytes(dd / f"{split}.npz", buf.getvalue())
    atomic_write_json(dd / f"{split}.done.json", {"representatives": rep_ids})


def _read_ids(path: Path) -> list[str]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return data.decode("utf-8").split("\n")[:-1] if data else []


# ---------------------------------------------------------------- stage 3: index


def index_task(job: PrepareJob, _: str) -> None:
    cfg = job.cfg

    def texts() -> Iterator[str]:
        for split in cfg.decontam.against_splits:
            for t in job.split_tasks(split):
                for rec in iter_records(job.clean_path(t, "docs.jsonl.zst")):
                    yield rec["text"]
        if cfg.decontam.eval_files:
            for doc in read_documents(cfg.decontam.eval_files, cfg.reader):
                yield doc.text

    n = build_index(texts(), job.work / "index", cfg.decontam.ngram)
    atomic_write_json(job.work / "index" / "done.json", {"ngrams": n})


def count_task(job: PrepareJob, task: Task) -> None:
    """The indexed n-grams each kept document of a train task contains (GPT-3's rule that
    n-grams in more than ``max_train_docs`` training documents do not count)."""
    index = NgramIndex(job.work / "index", use_ignored=False)
    reason, _, _ = _dedup_verdicts(job, task, None)
    parts: list[np.ndarray] = []
    batch: list[str] = []
    size = 0
    for i, rec in enumerate(iter_records(job.clean_path(task, "docs.jsonl.zst"))):
        if reason is not None and reason[i]:
            continue
        batch.append(rec["text"])
        size += len(rec["text"])
        if size >= BATCH_BYTES:
            parts.append(matched_ngrams(batch, index, job.cfg.decontam.ngram))
            batch, size = [], 0
    if batch:
        parts.append(matched_ngrams(batch, index, job.cfg.decontam.ngram))
    buf = io.BytesIO()
    np.save(buf, np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64))
    atomic_write_bytes(job.work / "count" / f"{task.name}.npy", buf.getvalue())


def ignore_frequent_ngrams(job: PrepareJob) -> int:
    """Write ``index/ignored.npy`` from the count tasks; returns how many n-grams it holds."""
    tasks = job.split_tasks("train")
    ignored = frequent_ngrams((np.load(job.work / "count" / f"{t.name}.npy") for t in tasks),
                              job.cfg.decontam.max_train_docs)
    buf = io.BytesIO()
    np.save(buf, ignored)
    atomic_write_bytes(job.work / "index" / IGNORED, buf.getvalue())
    atomic_write_json(job.work / "index" / "ignored.done.json", {"ignored": int(ignored.size)})
    return int(ignored.size)


def _dedup_verdicts(job: PrepareJob, task: Task, n_docs: int | None
                    ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, str]]:
    """(dedup reason per document, 0 = kept; its representative; representative ids) of a
    task; the reasons are zeros of ``n_docs`` (or None) when dedup did not run."""
    dd = job.work / "dedup" / f"{task.split}.npz"
    if not dd.is_file():
        return (None if n_docs is None else np.zeros(n_docs, dtype=np.uint8)), None, {}
    pos = [t.name for t in job.split_tasks(task.split)].index(task.name)
    with np.load(dd) as z:
        a, b = int(z["offsets"][pos]), int(z["offsets"][pos + 1])
        reason, rep = z["reason"][a:b], z["representative"][a:b]
    rep_ids = json.loads((job.work / "dedup" / f"{task.split}.done.json").read_text())["representatives"]
    return reason, rep, rep_ids


# ---------------------------------------------------------------- stage 4: write


def write_task(job: PrepareJob, task: Task) -> None:
    cfg = job.cfg
    stats = TaskStats()
    rejects = RejectsLog(job.work / "write" / f"{task.name}.rejects.zst")
    ids = _read_ids(job.clean_path(task, "ids.zst"))
    reason, rep, rep_ids = _dedup_verdicts(job, task, len(ids))
    index = None
    if task.split == "train" and cfg.decontam.enabled and (job.work / "index" / "done.json").is_file():
        index = NgramIndex(job.work / "index")
        if len(index) == 0:
            index = None
    out_buf = io.BytesIO()
    out = _zstd_writer(out_buf, cfg.compression_level)

    def drop(doc: Document, why: str, detail: str) -> None:
        n = len(doc.text.encode())
        stats.dropped(doc.component, why, n)
        rejects.write(why, doc.id, task.split, doc.component, n, detail, doc.text[:120])

    def emit(batch: list[Document]) -> None:
        cuts = decontaminate([d.text for d in batch], index, cfg.decontam) if index is not None else [None] * len(batch)
        for doc, cut in zip(batch, cuts, strict=True):
            if cut is not None:
                stats.decontam_cuts += cut.cuts
                if cut.text is None:
                    drop(doc, cut.reason, f"{cut.cuts} overlapping spans")
                    continue
                stats.edited(doc.component, "decontam", len(doc.text.encode()) - len(cut.text.encode()))
                doc.note_change("decontam_cut", cut.cuts)
                doc.text = cut.text
            data = doc.text.encode()
            stats.kept(doc.component, len(data), len(doc.text))
            out.write(encode_record(doc.text, doc.meta))

    batch: list[Document] = []
    size = 0
    for i, rec in enumerate(iter_records(job.clean_path(task, "docs.jsonl.zst"))):
        doc = Document(ids[i], rec["text"], rec["meta"])
        if reason[i]:
            assert rep is not None
            drop(doc, DEDUP_REASONS[int(reason[i])], f"duplicate of {rep_ids.get(str(int(rep[i])), '?')}")
            continue
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_BYTES:
            emit(batch)
            batch, size = [], 0
    if batch:
        emit(batch)
    out.flush(zstandard.FLUSH_FRAME)
    atomic_write_bytes(shard_path(job.out, task.split, task.index), out_buf.getvalue())
    atomic_write_bytes(job.work / "write" / f"{task.name}.rejects.zst", rejects.getvalue())
    atomic_write_json(job.work / "write" / f"{task.name}.done.json", stats.to_json())
