"""``pilelm tokenize``: prepared ``.jsonl.zst`` -> Megatron MMIDIDX token shards, in parallel.

    pilelm tokenize PREPARED_DIR --tokenizer TOKENIZER_DIR -o SHARD_DIR [--workers N]

For every split present (``train``, ``val``, ``test``) it writes ``SHARD_DIR/<split>.bin/.idx``
(one EOD token after every document, uint16 when the vocabulary fits, else int32),
``<split>.docmeta.npz`` (component code and UTF-8 bytes per document) and
``<split>.components.json``; the tokenizer is copied into ``SHARD_DIR/tokenizer/``.

How it runs (``pilelm.tokens.encode``): with gigatoken or fastokens, in this process: a reader
thread reads and parses batches of JSON lines while the main thread encodes them (the encoder's
own ``workers`` threads) and appends the ids in input order to spill files under
``SHARD_DIR/.partial/``; with tiktoken or tokenizers, ``workers`` processes parse and encode
the batches and this one appends the results. The manifest records the tokenizer's fingerprint
(``pilelm.tokens.identity``), which training and evaluation check the ids against.

Resuming: every ``checkpoint_seconds`` the spill files are fsynced and the position (file,
last line done) is saved atomically with their lengths. A run killed at any point (even
``kill -9``) and started again cuts the spill files back to the saved lengths, skips the
input already done and continues; the output is byte-identical to an uninterrupted run's.
The finished files are renamed into place, then the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pilelm import __version__
from pilelm.core.atomic import atomic_write_json
from pilelm.core.config import to_dict
from pilelm.core.manifest import MANIFEST, Timer, content_hash, read_manifest, require_stage, write_manifest
from pilelm.core.workers import worker_count
from pilelm.data.prepared import SHARD_SUFFIX, SPLITS, split_files
from pilelm.tokens.encode import BatchEncoder, EncodedBatch, LineBatch, iter_line_batches
from pilelm.tokens.encoders import ENCODERS, IN_PROCESS_ENCODERS, encoder_threads, encoder_threads_started
from pilelm.tokens.identity import tokenizer_fingerprint
from pilelm.tokens.mmidx import AppendFile, IndexedDataset, IndexedDatasetWriter, token_dtype
from pilelm.tokens.shards import TOKENIZER_DIR, has_split, remove_split, save_split_sidecars, split_prefix
from pilelm.tokens.tokenizer import copy_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

PARTIAL = ".partial"


@dataclass
class TokenizeConfig:
    data: Path | None = None
    """Prepared directory (`pilelm prepare` output) with <split>/*.jsonl.zst."""
    tokenizer: Path | None = None
    """Tokenizer: a `pilelm tokenizer train` dir, a tokenizer.json, a Hugging Face tokenizer
    folder or a tiktoken rank file (*.tiktoken)."""
    output: Path | None = None
    """Output shard directory."""
    splits: list[str] = field(default_factory=list)
    """Splits to tokenize; empty: every split the prepared dir has."""
    workers: int = 0
    """Cores to encode on; 0: every core this process may use. gigatoken and fastokens encode in
    this process on that many threads; tiktoken and tokenizers in that many processes (1: in this
    process)."""
    batch_bytes: int = 500_000
    """Raw JSON bytes per batch (one encode call)."""
    checkpoint_seconds: float = 30.0
    """Make progress durable (fsync + position) this often; a killed run resumes from it."""
    encoder: str = "auto"
    """Library that encodes: auto (the fastest proven at load time to give tokenizers' ids
    for this tokenizer: gigatoken, fastokens, tiktoken, then tokenizers) or one of those names."""

    def __post_init__(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"splits: {bad} are not among {', '.join(SPLITS)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per core), got {self.workers}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be positive, got {self.batch_bytes}")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")
        if self.encoder not in ("auto", *ENCODERS):
            raise ValueError(f"encoder: {self.encoder!r} is not auto or one of {', '.join(ENCODERS)}")


# ---------------------------------------------------------------- one split, resumable


@dataclass
class SplitProgress:
    """What a resumed run needs: where the input stands and how long each spill file is."""

    fingerprint: str
    file_index: int = 0
    last_line: int = 0
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    component_names: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> SplitProgress | None:
        if not path.is_file():
            return None
        try:
            saved = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):  # unreadable or from another version: start over
            return None
        return saved if saved.fingerprint == fingerprint else None


class SplitWriter:
    """The spill files of one split: tokens (+ sizes), component codes, byte counts."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, progress: SplitProgress, resume: bool):
        self.out, self.split, self.progress = out, split, progress
        work = out / PARTIAL
        work.mkdir(parents=True, exist_ok=True)
        docs = progress.documents if resume else None
        self.tokens = IndexedDatasetWriter(split_prefix(out, split), dtype, work_dir=work,
                                           resume=(progress.documents, progress.tokens) if resume else None)
        self.component = AppendFile(work / f"{split}.component.partial", np.int16, docs)
        self.nbytes = AppendFile(work / f"{split}.nbytes.partial", np.int64, docs)
        self.codes = {name: i for i, name in enumerate(progress.component_names)}
        self.skipped = Counter(progress.skipped)
        self.progress_path = work / f"{split}.progress.json"

    def add(self, batch: LineBatch, enc: EncodedBatch) -> None:
        for name in enc.components:
            if name not in self.codes:
                if len(self.codes) >= np.iinfo(np.int16).max:
                    raise ValueError(f"split {self.split}: more than 32767 distinct components")
                self.codes[name] = len(self.codes)
                self.progress.component_names.append(name)
        self.tokens.add_documents(enc.tokens, enc.sizes)
        self.component.append(np.fromiter((self.codes[n] for n in enc.components), dtype=np.int16,
                                          count=len(enc.components)))
        self.nbytes.append(enc.nbytes)
        self.skipped.update(batch.skipped)
        self.skipped.update(enc.skipped)
        p = self.progress
        p.file_index, p.last_line = batch.file_index, batch.last_line
        p.documents += len(enc.sizes)
        p.tokens += len(enc.tokens)
        p.text_bytes += int(enc.nbytes.sum())

    def checkpoint(self) -> None:
        self.tokens.flush()
        self.component.flush()
        self.nbytes.flush()
        self.progress.skipped = dict(self.skipped)
        atomic_write_json(self.progress_path, self.progress.__dict__)

    def finalize(self) -> dict[str, Any]:
        self.component.flush()
        self.nbytes.flush()
        self.component.close()
        self.nbytes.close()
        self.tokens.finalize()
        component, nbytes = self.component.read(), self.nbytes.read()
        save_split_sidecars(self.out, self.split, component, nbytes, self.progress.component_names)
        stats = split_stats(split_prefix(self.out, self.split), component, nbytes, self.progress.component_names)
        stats["skipped"] = dict(self.skipped)
        for p in (self.component.path, self.nbytes.path, self.progress_path):
            p.unlink(missing_ok=True)
        return stats


def split_stats(prefix: Path, component: np.ndarray, nbytes: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Documents, tokens (without EOD), bytes and bytes per token, overall and per component."""
    ds = IndexedDataset(prefix)
    n = len(ds)
    tok = np.bincount(component, weights=ds.sizes.astype(np.float64) - 1, minlength=len(names)) if n else np.zeros(len(names))
    byt = np.bincount(component, weights=nbytes.astype(np.float64), minlength=len(names)) if n else np.zeros(len(names))
    docs = np.bincount(component, minlength=len(names)) if n else np.zeros(len(names), dtype=np.int64)
    per = {name: {"documents": int(docs[i]), "tokens": int(tok[i]), "bytes": int(byt[i]),
                  "bytes_per_token": round(float(byt[i] / tok[i]), 4) if tok[i] else None}
           for i, name in enumerate(names)}
    total_tokens = int(ds.sizes.sum(dtype=np.int64))
    return {"documents": n, "tokens": total_tokens, "tokens_without_eod": total_tokens - n,
            "bytes": int(nbytes.sum()), "dtype": ds.dtype.name,
            "bytes_per_token": round(float(nbytes.sum()) / (total_tokens - n), 4) if total_tokens > n else None,
            "components": per}


def _fingerprint(cfg: TokenizeConfig, split: str, files: list[Path], tokenizer: str, dtype: np.dtype) -> str:
    """Identifies the work of one split: a saved position is only valid for the same one."""
    h = hashlib.sha256()
    # The encoder is left out: every one in use is proven to give the same ids.
    h.update(json.dumps([__version__, split, str(dtype), tokenizer,
                         [(f.name, f.stat().st_size) for f in files]]).encode())
    return h.hexdigest()


def tokenize_split(cfg: TokenizeConfig, enc: BatchEncoder, files: list[Path], split: str, out: Path,
                   dtype: np.dtype, eod_id: int, tokenizer: str) -> dict[str, Any]:
    fingerprint = _fingerprint(cfg, split, files, tokenizer, dtype)
    done_path = out / PARTIAL / f"{split}.done.json"
    if done_path.is_file() and has_split(out, split):
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") == fingerprint:
            log.info("%s: already tokenized by an earlier run", split)
            return done["stats"]
    progress_path = out / PARTIAL / f"{split}.progress.json"
    saved = SplitProgress.load(progress_path, fingerprint)
    writer = None
    if saved is not None:
        try:
            writer = SplitWriter(out, split, dtype, saved, resume=True)
            log.info("%s: resuming after %d documents (file %s, line %d)", split, saved.documents,
                     files[saved.file_index].name if saved.file_index < len(files) else "-", saved.last_line)
        except ValueError as e:  # spill files gone or short: the run died while finishing the split
            log.warning("%s: cannot resume (%s); starting the split again", split, e)
            saved = None
    progress = saved or SplitProgress(fingerprint)
    if writer is None:
        writer = SplitWriter(out, split, dtype, progress, resume=False)
    batches = iter_line_batches(files, cfg.batch_bytes, (progress.file_index, progress.last_line))
    last_save = time.monotonic()
    bar = tqdm(desc=f"tokenize {split}", unit="B", unit_scale=True, disable=None, initial=progress.text_bytes)
    try:
        for batch, encoded in enc.map(batches, files, eod_id, dtype):
            writer.add(batch, encoded)
            bar.update(int(encoded.nbytes.sum()))
            if time.monotonic() - last_save >= cfg.checkpoint_seconds:
                writer.checkpoint()
                last_save = time.monotonic()
    finally:
        bar.close()
    stats = writer.finalize()
    atomic_write_json(done_path, {"fingerprint": fingerprint, "stats": stats})
    return stats


def run_tokenize(cfg: TokenizeConfig) -> Path:
    if cfg.data is None or cfg.tokenizer is None or cfg.output is None:
        raise ValueError("give the prepared data, a tokenizer and an output dir: "
                         "pilelm tokenize PREPARED_DIR --tokenizer TOKENIZER_DIR -o SHARD_DIR")
    prep, out = Path(cfg.data), Path(cfg.output)
    require_stage(prep, "prepare", what="data")
    splits = list(cfg.splits) or [s for s in SPLITS if split_files(prep, s)]
    missing = [s for s in splits if not split_files(prep, s)]
    if missing or not splits:
        raise FileNotFoundError(f"{prep} has no documents for split(s) {', '.join(missing or SPLITS)} "
                                f"(expected {prep}/<split>/*{SHARD_SUFFIX})")
    inputs = [prep, Path(cfg.tokenizer)]
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        same_inputs = [i.get("hash") for i in old.get("inputs", [])] == [content_hash(p) for p in inputs]
        # workers, batch_bytes, checkpoint_seconds and encoder change how, not what, is written.
        what = ("data", "tokenizer", "splits")
        same_config = {k: old.get("config", {}).get(k) for k in what} == {k: to_dict(cfg)[k] for k in what}
        if old.get("stage") == "tokenize" and same_config and same_inputs:
            log.info("%s is up to date with %s; nothing to do", out, prep)
            return out
        (out / MANIFEST).unlink()  # rewriting: the dir is unfinished until the new manifest

    timer = Timer()
    workers = worker_count(cfg.workers)
    # gigatoken and fastokens size their thread pools at their first encode in a process (the
    # load-time probe): if one is the encoder, it runs here on `workers` threads; the others
    # run in processes.
    with timer("load_tokenizer"), encoder_threads(workers):
        tok = load_tokenizer(cfg.tokenizer, encoder=cfg.encoder)
    processes = 1 if tok.encoder.name in IN_PROCESS_ENCODERS else workers
    if tok.eod_id is None:
        raise ValueError(f"tokenizer {cfg.tokenizer} has no end-of-document token "
                         "(<|endoftext|>, </s> or [SEP]); the shards need one after every document")
    out.mkdir(parents=True, exist_ok=True)
    for stale in set(SPLITS) - set(splits):  # an old split (maybe another vocabulary) must not outlive a rewrite
        remove_split(out, stale)
    copy_tokenizer(cfg.tokenizer, out / TOKENIZER_DIR)
    fingerprint = tokenizer_fingerprint(tok)
    dtype = token_dtype(tok.vocab_size)
    log.info("tokenizing %s with %s (%s, vocab %d, %s) on %d core(s), %d process(es)", ", ".join(splits),
             cfg.tokenizer, tok.backend, tok.vocab_size, dtype.name, workers, processes)
    # Forked workers start with the tokenizer loaded, unless a native thread pool (a probed,
    # passed-over Rust encoder) makes forking unsafe.
    enc = BatchEncoder(tok, out / TOKENIZER_DIR, processes, inherit=not encoder_threads_started())
    stats: dict[str, Any] = {}
    try:
        for split in splits:
            with timer(split):
                stats[split] = tokenize_split(cfg, enc, split_files(prep, split), split, out,
                                              dtype, int(tok.eod_id), fingerprint)
            s = stats[split]
            log.info("%s: %d documents, %d tokens, %.1f MB of text, %.3f bytes/token, %.1f MB/s", split,
                     s["documents"], s["tokens"], s["bytes"] / 1e6, s["bytes_per_token"] or 0.0,
                     s["bytes"] / 1e6 / max(timer.timings[split], 1e-9))
            for name, c in s["components"].items():
                log.info("  %-24s %8d docs %10d tokens %7.3f bytes/token", name, c["documents"], c["tokens"],
                         c["bytes_per_token"] or 0.0)
    finally:
        enc.close()
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    counts = {
        "documents": sum(s["documents"] for s in stats.values()),
        "tokens": sum(s["tokens"] for s in stats.values()),
        "bytes": sum(s["bytes"] for s in stats.values()),
        "splits": stats,
    }
    extra = {"tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": int(tok.eod_id),
                           "pad_id": tok.pad_id, "fingerprint": fingerprint, "backend": tok.backend,
                           "source": str(cfg.tokenizer),
                           "encoder": {"name": tok.encoder.name, "version": tok.encoder.version,
                                       "passed_over": tok.passed_over}},
             "dtype": dtype.name, "workers": workers, "processes": processes}
    write_manifest(out, "tokenize", cfg, inputs=inputs, counts=counts, timings=timer.timings, extra=extra)
    return out
