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
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_bytes, atomic_write_json
from pilelm.core.config import to_dict
from pilelm.core.manifest import MANIFEST, Timer, read_manifest, write_manifest
from pilelm.core.stages import load_hook
from pilelm.data.config import PrepareConfig
from pilelm.data.executor import LocalExecutor, RayExecutor, make_executor
from pilelm.data.plan import PrepareJob, Task, plan_tasks
from pilelm.data.prepare_tasks import (
    clean_task,
    count_task,
    dedup_task,
    ignore_frequent_ngrams,
    index_task,
    write_task,
)
from pilelm.data.prepared import REJECTS, SPLITS, STATS, WORK, output_names, split_files
from pilelm.data.sources import SkippedFile, SourceFile, expand_inputs
from pilelm.data.stats import TaskStats, write_report

log = logging.getLogger(__name__)

__all__ = ["PrepareConfig", "run_prepare"]


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
    for name in output_names():
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)
        else:
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
        planned = _plan(cfg, out)
        if planned is None:
            log.info("%s already holds this prepared dataset; nothing to do", out)
            return out
        sources, skipped, fp, tasks = planned
    for s in sources:
        if s.size == 0 and s.format != "hf":
            log.warning("%s is empty", s.path)
    job = PrepareJob(cfg, sources, out, tasks)
    splits = [s for s in SPLITS if job.split_tasks(s)]
    log.info("prepare: %d inputs -> %d tasks (%s) with %s executor", len(sources), len(tasks),
             ", ".join(f"{s}: {len(job.split_tasks(s))}" for s in splits), cfg.executor.kind)
    _run_tasks(job, splits, timer)
    canaries = None
    if cfg.privacy.canaries:  # pilelm/privacy/canaries.py
        with timer("canaries"):
            canaries = load_hook("prepare.canaries")(cfg.privacy, out, job.work, cfg.compression_level)
    file_notes = {
        "skipped_files": [{"file": f.path, "reason": f.reason} for f in skipped or []],
        "read_by_content": [{"file": s.display, "note": s.note} for s in sources if s.note],
    }
    with timer("report"):
        counts, report_files = _finish(job, file_notes)
    extra = _manifest_extra(job, fp, splits, report_files, file_notes)
    if canaries:
        extra["canaries"] = canaries
    if not cfg.keep_work:
        shutil.rmtree(job.work, ignore_errors=True)
    inputs = [s.path for s in sources if s.format != "hf"]
    write_manifest(out, "prepare", cfg, inputs=inputs, counts=counts, timings=timer.timings, extra=extra)
    log.info("prepare: %d -> %d documents, %.1f -> %.1f MB; report in %s", counts["documents_in"],
             counts["documents_out"], counts["bytes_in"] / 1e6, counts["bytes_out"] / 1e6, out / STATS)
    return out


def _plan(cfg: PrepareConfig, out: Path) -> tuple[list[SourceFile], list[SkippedFile] | None, str, list[Task]] | None:
    """(sources, files skipped, fingerprint, tasks), with the plan written to the work dir; None
    when ``out`` already holds this prepared dataset."""
    skipped: list[SkippedFile] | None = [] if cfg.reader.on_bad_file == "skip" else None
    sources = expand_inputs(cfg.inputs, cfg.reader.default_component, skipped)
    if not sources:
        raise ValueError(f"inputs: no readable file among {cfg.inputs} (all skipped; see the warnings above)")
    fp = _fingerprint(cfg, sources)
    if _prepare_output(cfg, out, fp):
        return None
    tasks = plan_tasks(sources, cfg.executor)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / WORK / "plan.json", {"fingerprint": fp, "tasks": [t.name for t in tasks]})
    return sources, skipped, fp, tasks


def _run_tasks(job: PrepareJob, splits: list[str], timer: Timer) -> None:
    """The four kinds of task in order (clean, dedup, decontamination index, write), each
    skipping the tasks whose completion marker exists."""
    cfg = job.cfg
    executor = make_executor(cfg.executor)
    try:
        with timer("clean"):
            todo = [t for t in job.tasks if not job.clean_path(t, "done.json").is_file()]
            executor.map(functools.partial(clean_task, job), todo, "clean")
        with timer("dedup"):
            if cfg.dedup.exact or cfg.dedup.minhash:
                todo_s = [s for s in splits if not (job.work / "dedup" / f"{s}.done.json").is_file()]
                executor.map(functools.partial(dedup_task, job), todo_s, "dedup")
        with timer("decontam_index"):
            _decontamination_index(job, splits, executor)
        with timer("write"):
            for s in splits:
                (job.out / s).mkdir(parents=True, exist_ok=True)
            todo = [t for t in job.tasks if not (job.work / "write" / f"{t.name}.done.json").is_file()]
            executor.map(functools.partial(write_task, job), todo, "write")
    finally:
        executor.close()


def _decontamination_index(job: PrepareJob, splits: list[str], executor: LocalExecutor | RayExecutor) -> None:
    """The evaluation n-gram index, then (decontam.max_train_docs) the n-grams too frequent in
    the training documents to mean contamination, counted and ignored."""
    cfg = job.cfg
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
        n_ignored = ignore_frequent_ngrams(job)
        log.info("decontam: %d evaluation n-grams occur in more than %d training documents; ignored",
                 n_ignored, cfg.decontam.max_train_docs)


def _manifest_extra(job: PrepareJob, fp: str, splits: list[str], report_files: list[str],
                    file_notes: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """What the manifest records beside the counts: the plan, the shards, the report files and
    the decontamination index sizes."""
    n_idx = n_ignored = 0
    if (job.work / "index" / "done.json").is_file():
        n_idx = json.loads((job.work / "index" / "done.json").read_text())["ngrams"]
    if (job.work / "index" / "ignored.done.json").is_file():
        n_ignored = json.loads((job.work / "index" / "ignored.done.json").read_text())["ignored"]
    return {
        "fingerprint": fp,
        "shards": {s: [p.name for p in split_files(job.out, s)] for s in splits},
        "tasks": [{"name": t.name, "pieces": [[job.sources[p.source].display, p.start, p.end] for p in t.pieces]}
                  for t in job.tasks],
        "report": report_files,
        "rejects": REJECTS,
        "decontam_index_ngrams": n_idx,
        "decontam_ignored_ngrams": n_ignored,
        "dedup_threshold": round(job.cfg.dedup.threshold(), 4),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **file_notes,
    }


def _finish(job: PrepareJob, file_notes: dict[str, list[dict[str, str]]]) -> tuple[dict[str, Any], list[str]]:
    """Merge task stats, concatenate the rejects logs (zstd frames concatenate), report."""
    per_split: dict[str, list[dict[str, Any]]] = {}
    rejects = []
    for t in job.tasks:
        parts = [json.loads(job.clean_path(t, "done.json").read_text()),
                 json.loads((job.work / "write" / f"{t.name}.done.json").read_text())]
        per_split.setdefault(t.split, []).extend(parts)
        rejects.append(job.clean_path(t, "rejects.zst").read_bytes())
        rejects.append((job.work / "write" / f"{t.name}.rejects.zst").read_bytes())
    atomic_write_bytes(job.out / REJECTS, b"".join(rejects))
    split_stats = {s: TaskStats.merge(p) for s, p in per_split.items()}
    total = TaskStats.merge([p for parts in per_split.values() for p in parts])
    files = write_report(job.out, total, split_stats, file_notes=file_notes)
    counts = total.manifest_counts()
    counts["files_skipped"] = len(file_notes["skipped_files"])
    counts["splits"] = {s: st.totals() | {"shards": len(job.split_tasks(s))} for s, st in split_stats.items()}
    return counts, files
