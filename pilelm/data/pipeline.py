"""``pilelm prepare``: raw Pile-format data -> clean, deduplicated, decontaminated shards.

Stages (each a list of tasks run by an executor; each task writes atomically and then a
completion marker, so a killed run resumes and produces the same bytes):

1. **clean** (one task per file, byte range of a big file, or group of small files): read,
   normalise, filter, scrub PII; write the kept documents and their dedup keys to
   ``OUT/.work/clean/``.
2. **dedup** (one task per split): cluster exact and MinHash-LSH duplicates from the keys.
3. **index** (one task): the 13-gram index of the evaluation text (val/test + extra files);
   then **count** (one task per train task): the indexed n-grams in each kept train document,
   so that n-grams found in more than ``decontam.max_train_docs`` documents (boilerplate) are
   ignored, as GPT-3 did.
4. **write** (one task per stage-1 task): drop duplicates, decontaminate the train split,
   write ``OUT/<split>/NNNNN.jsonl.zst``.

Then ``OUT/rejects.jsonl.zst`` (every dropped record: reason, file:line, preview),
``OUT/stats.md`` with ``lengths.png`` and ``removed.png``, and ``OUT/manifest.json`` last.
Shard files sorted by name give the canonical document order (input order).

The step protocol: a step maps a batch of documents to the kept ones and reports each drop
as ``drop(doc, reason, detail)``; see ``filters.Cleaner``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from pilelm.core.atomic import atomic_write_bytes, atomic_write_json
from pilelm.core.config import to_dict
from pilelm.core.manifest import MANIFEST, Timer, read_manifest, write_manifest
from pilelm.data.decontam import (
    IGNORED,
    DecontamConfig,
    NgramIndex,
    build_index,
    decontaminate,
    frequent_ngrams,
    matched_ngrams,
)
from pilelm.data.dedup import DedupConfig, document_keys, find_duplicates, permutations
from pilelm.data.document import Document
from pilelm.data.executor import ExecutorConfig, make_executor
from pilelm.data.filters import Cleaner, FilterConfig
from pilelm.data.pii import PiiConfig, PiiScrubber
from pilelm.data.readers import (
    SPLITS,
    ReaderConfig,
    Rejected,
    SourceFile,
    estimate_size,
    expand_inputs,
    iter_source,
    read_documents,
)
from pilelm.data.stats import RejectsLog, TaskStats, write_report
from pilelm.data.words import tokenize

log = logging.getLogger(__name__)

WORK = ".work"
BATCH_BYTES = 4 << 20
UNREADABLE = "(unreadable)"
# The step a drop reason belongs to (for "what each step removed").
DEDUP_REASONS = {1: "exact_duplicate", 2: "near_duplicate"}


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Input files, folders or globs (.jsonl, .jsonl.zst, .jsonl.gz, .parquet, folders of
    .txt), or `hf:NAME[#CONFIG][@SPLIT]` for a Hugging Face dataset. Files named val*/test*
    or inside val/ or test/ folders form those splits; the rest is train."""
    output: str = ""
    """Output directory (-o)."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How records are read."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Normalisation and quality filters."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """PII scrubbing."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and MinHash-LSH deduplication."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Decontamination of train against evaluation text."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where tasks run."""
    compression_level: int = 3
    """zstd level of the output shards."""
    overwrite: bool = False
    """Replace an output directory prepared with a different config or different inputs."""
    keep_work: bool = False
    """Keep the intermediate files in OUT/.work after success."""

    def __post_init__(self) -> None:
        if not 1 <= self.compression_level <= 22:
            raise ValueError("compression_level must be in 1..22 (zstd levels)")


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Piece:
    source: int
    """Index into the run's sources."""
    start: int = 0
    end: int | None = None
    """Decompressed byte range (JSON lines) or row-group range (Parquet); None = to the end."""


@dataclass(frozen=True)
class Task:
    split: str
    index: int
    pieces: tuple[Piece, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def plan_tasks(sources: list[SourceFile], cfg: ExecutorConfig) -> list[Task]:
    """Split big files into ranges and group small consecutive files, per split; the plan
    depends only on the inputs and the config, never on the number of workers."""
    tasks: list[Task] = []
    for split in SPLITS:
        groups: list[list[Piece]] = []
        group: list[Piece] = []
        group_size = 0
        for i, src in enumerate(sources):
            if src.split != split:
                continue
            ranges = _ranges(src, cfg.task_bytes)
            size = ranges[0][2]
            if len(ranges) == 1 and size < cfg.group_bytes:
                if group and group_size + size > cfg.group_bytes:
                    groups.append(group)
                    group, group_size = [], 0
                group.append(Piece(i))
                group_size += size
                continue
            if group:
                groups.append(group)
                group, group_size = [], 0
            groups.extend([Piece(i, a, b)] for a, b, _ in ranges)
        if group:
            groups.append(group)
        tasks.extend(Task(split, k, tuple(g)) for k, g in enumerate(groups))
    return tasks


def _ranges(src: SourceFile, task_bytes: int) -> list[tuple[int, int | None, int]]:
    """(start, end, size) ranges of one source."""
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


# ---------------------------------------------------------------- the job


@dataclass
class PrepareJob:
    """Everything a task needs (pickled to workers)."""

    cfg: PrepareConfig
    sources: list[SourceFile]
    out: Path
    tasks: list[Task]

    @property
    def work(self) -> Path:
        return self.out / WORK

    def clean_path(self, task: Task, kind: str) -> Path:
        return self.work / "clean" / f"{task.name}.{kind}"

    def split_tasks(self, split: str) -> list[Task]:
        return [t for t in self.tasks if t.split == split]


def _zstd_writer(buf: io.BytesIO, level: int) -> Any:
    return zstandard.ZstdCompressor(level=level).stream_writer(buf, closefd=False)


def _dumps(record: dict[str, Any]) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates in metadata: escape them
        return json.dumps(record, ensure_ascii=True).encode("ascii") + b"\n"


def _read_jsonl_zst(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_size=1 << 20) as r:
        rest = b""
        while chunk := r.read(8 << 20):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield json.loads(line)
        if rest:
            yield json.loads(rest)


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
            docs_out.write(_dumps({"text": doc.text, "meta": doc.meta}))
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
                for rec in _read_jsonl_zst(job.clean_path(t, "docs.jsonl.zst")):
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
    for i, rec in enumerate(_read_jsonl_zst(job.clean_path(task, "docs.jsonl.zst"))):
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


def _ignore_frequent_ngrams(job: PrepareJob) -> int:
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
            out.write(_dumps({"text": doc.text, "meta": doc.meta}))

    batch: list[Document] = []
    size = 0
    for i, rec in enumerate(_read_jsonl_zst(job.clean_path(task, "docs.jsonl.zst"))):
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
    atomic_write_bytes(job.out / task.split / f"{task.index:05d}.jsonl.zst", out_buf.getvalue())
    atomic_write_bytes(job.work / "write" / f"{task.name}.rejects.zst", rejects.getvalue())
    atomic_write_json(job.work / "write" / f"{task.name}.done.json", stats.to_json())


# ---------------------------------------------------------------- the runner


def _fingerprint(cfg: PrepareConfig, sources: list[SourceFile]) -> str:
    """What decides the output: the config (less where tasks run) and the input files."""
    d = to_dict(cfg)
    for k in ("executor", "overwrite", "keep_work", "output"):
        d.pop(k, None)
    d["task_plan"] = {"task_bytes": cfg.executor.task_bytes, "group_bytes": cfg.executor.group_bytes}
    files = []
    for s in sources:
        st = Path(s.path).stat() if s.format != "hf" else None
        files.append([s.display, s.size, st.st_mtime_ns if st else 0])
    blob = json.dumps({"config": d, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _clear_output(out: Path) -> None:
    for name in (*SPLITS, WORK):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (MANIFEST, "rejects.jsonl.zst", "stats.md", "lengths.png", "removed.png"):
        (out / name).unlink(missing_ok=True)


def _prepare_output(cfg: PrepareConfig, out: Path, fp: str) -> bool:
    """Check/clear the output directory; True if it already holds this exact result."""
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if m.get("stage") == "prepare" and m.get("extra", {}).get("fingerprint") == fp and not cfg.overwrite:
            return True
        if not cfg.overwrite:
            raise ValueError(f"{out} already holds a prepared dataset made with other settings or inputs; "
                             "choose another -o or pass --overwrite")
        _clear_output(out)
    work = out / WORK
    plan = work / "plan.json"
    if plan.is_file():
        old = json.loads(plan.read_text()).get("fingerprint")
        if old != fp:
            if not cfg.overwrite:
                raise ValueError(f"{out} holds an unfinished run with other settings or inputs; rerun that "
                                 "command to finish it, or pass --overwrite to start over")
            _clear_output(out)
    elif out.is_dir() and any(p.name not in (*SPLITS,) for p in out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"output directory {out} is not empty; choose another -o or pass --overwrite")
    return False


def run_prepare(cfg: PrepareConfig) -> Path:
    """Run ``pilelm prepare``; returns the output directory."""
    if not cfg.inputs:
        raise ValueError("inputs: give at least one input file, folder or glob")
    if not cfg.output:
        raise ValueError("output: give the output directory with -o")
    out = Path(cfg.output)
    timer = Timer()
    with timer("plan"):
        sources = expand_inputs(cfg.inputs, cfg.reader)
        fp = _fingerprint(cfg, sources)
        if _prepare_output(cfg, out, fp):
            log.info("%s already holds this prepared dataset; nothing to do", out)
            return out
        tasks = plan_tasks(sources, cfg.executor)
        (out / WORK).mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / WORK / "plan.json", {"fingerprint": fp, "tasks": [t.name for t in tasks]})
    for s in sources:
        if s.size == 0 and s.format != "hf":
            log.warning("%s is empty", s.path)
    job = PrepareJob(cfg, sources, out, tasks)
    splits = [s for s in SPLITS if job.split_tasks(s)]
    log.info("prepare: %d inputs -> %d tasks (%s) with %s executor", len(sources), len(tasks),
             ", ".join(f"{s}: {len(job.split_tasks(s))}" for s in splits), cfg.executor.kind)
    executor = make_executor(cfg.executor)
    try:
        with timer("clean"):
            todo = [t for t in tasks if not job.clean_path(t, "done.json").is_file()]
            executor.map(functools.partial(clean_task, job), todo, "clean")
        with timer("dedup"):
            if cfg.dedup.exact or cfg.dedup.minhash:
                todo_s = [s for s in splits if not (job.work / "dedup" / f"{s}.done.json").is_file()]
                executor.map(functools.partial(dedup_task, job), todo_s, "dedup")
        with timer("decontam_index"):
            if cfg.decontam.enabled and "train" in splits and not (job.work / "index" / "done.json").is_file():
                has_eval = any(job.split_tasks(s) for s in cfg.decontam.against_splits) or cfg.decontam.eval_files
                if has_eval:
                    executor.map(functools.partial(index_task, job), ["index"], "decontam index")
            index_done = job.work / "index" / "done.json"
            if cfg.decontam.enabled and cfg.decontam.max_train_docs and index_done.is_file() \
                    and json.loads(index_done.read_text())["ngrams"] \
                    and not (job.work / "index" / "ignored.done.json").is_file():
                todo = [t for t in job.split_tasks("train") if not (job.work / "count" / f"{t.name}.npy").is_file()]
                executor.map(functools.partial(count_task, job), todo, "decontam count")
                n_ignored = _ignore_frequent_ngrams(job)
                log.info("decontam: %d evaluation n-grams occur in more than %d training documents; ignored",
                         n_ignored, cfg.decontam.max_train_docs)
        with timer("write"):
            for s in splits:
                (out / s).mkdir(parents=True, exist_ok=True)
            todo = [t for t in tasks if not (job.work / "write" / f"{t.name}.done.json").is_file()]
            executor.map(functools.partial(write_task, job), todo, "write")
    finally:
        executor.close()
    with timer("report"):
        counts, report_files = _finish(job)
    n_idx = n_ignored = 0
    if (job.work / "index" / "done.json").is_file():
        n_idx = json.loads((job.work / "index" / "done.json").read_text())["ngrams"]
    if (job.work / "index" / "ignored.done.json").is_file():
        n_ignored = json.loads((job.work / "index" / "ignored.done.json").read_text())["ignored"]
    extra = {
        "fingerprint": fp,
        "shards": {s: sorted(p.name for p in (out / s).glob("*.jsonl.zst")) for s in splits},
        "tasks": [{"name": t.name, "pieces": [[sources[p.source].display, p.start, p.end] for p in t.pieces]}
                  for t in tasks],
        "report": report_files,
        "rejects": "rejects.jsonl.zst",
        "decontam_index_ngrams": n_idx,
        "decontam_ignored_ngrams": n_ignored,
        "dedup_threshold": round(cfg.dedup.threshold(), 4),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not cfg.keep_work:
        shutil.rmtree(job.work, ignore_errors=True)
    inputs = [s.path for s in sources if s.format != "hf"]
    write_manifest(out, "prepare", cfg, inputs=inputs, counts=counts, timings=timer.timings, extra=extra)
    log.info("prepare: %d -> %d documents, %.1f -> %.1f MB; report in %s", counts["documents_in"],
             counts["documents_out"], counts["bytes_in"] / 1e6, counts["bytes_out"] / 1e6, out / "stats.md")
    return out


def _finish(job: PrepareJob) -> tuple[dict[str, Any], list[str]]:
    """Merge task stats, concatenate the rejects logs (zstd frames concatenate), report."""
    per_split: dict[str, list[dict[str, Any]]] = {}
    rejects = []
    for t in job.tasks:
        parts = [json.loads(job.clean_path(t, "done.json").read_text()),
                 json.loads((job.work / "write" / f"{t.name}.done.json").read_text())]
        per_split.setdefault(t.split, []).extend(parts)
        rejects.append(job.clean_path(t, "rejects.zst").read_bytes())
        rejects.append((job.work / "write" / f"{t.name}.rejects.zst").read_bytes())
    atomic_write_bytes(job.out / "rejects.jsonl.zst", b"".join(rejects))
    split_stats = {s: TaskStats.merge(p) for s, p in per_split.items()}
    total = TaskStats.merge([p for parts in per_split.values() for p in parts])
    files = write_report(job.out, total, split_stats)
    counts = total.manifest_counts()
    counts["splits"] = {s: st.totals() | {"shards": len(job.split_tasks(s))} for s, st in split_stats.items()}
    return counts, files
