"""``pilelm embed``: document vectors of a corpus into a searchable index directory.

Documents stream from a prepared dir (its splits) or from files; every ``part_docs`` documents
the chunks' vectors and texts are written as one part (``INDEX/parts/``, the vectors last, so
a part with vectors is whole). A run killed at any point restarts after its last whole part;
parts made with another config or model are discarded. When the stream ends the parts are
concatenated into ``vectors.npy`` (a memmap: memory stays one part plus the faiss index), the
faiss index and a BM25 index of the same chunks (``retrieval/hybrid.py``) are built, hybrid
search's dense weight is calibrated on pairs mined from the first ``calibration_docs``
documents, and the manifest is written last. See ``retrieval/index.py`` for the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from pilelm.core.atomic import atomic_path, atomic_write_json
from pilelm.core.config import require_at_least
from pilelm.core.manifest import MANIFEST, Timer, content_hash, read_manifest, write_manifest
from pilelm.data.document import Document
from pilelm.data.prepared import SPLITS, split_files
from pilelm.inference.text_encoder import POOLINGS, TextEncoder
from pilelm.models.dtypes import DTYPES
from pilelm.retrieval.hybrid import build_bm25, calibrate_fusion
from pilelm.retrieval.index import (
    CHUNK_OFFSETS,
    CHUNKS,
    DOCS,
    FAISS,
    HASHED_FILES,
    VECTORS,
    build_faiss,
    write_faiss,
)

log = logging.getLogger(__name__)

PARTS = "parts"
CALIBRATION_CHARS = 20000  # of each sampled document: enough for its pairs, bounded memory


@dataclass
class EmbedConfig:
    run: str = ""
    """Run directory whose model embeds the documents (pilelm train / import output)."""
    data: list[str] = field(default_factory=list)
    """A prepared dir (pilelm prepare output) or files, folders and globs of documents."""
    output: str = ""
    """Index directory to write (-o)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Splits of a prepared dir to embed (ignored for plain files)."""
    pooling: Literal["mean", "last", "cls"] = "mean"
    """How token states become one vector: mean of the tokens, the last token, or [CLS] (BERT only)."""
    chunk_tokens: int = 0
    """Tokens per chunk of a long document; 0 = the model's context."""
    chunk_stride: int = 0
    """A new chunk starts every this many tokens (overlap = chunk_tokens - stride); 0 = chunk_tokens."""
    max_chunks: int = 0
    """Embed at most this many chunks of each document (0 = all)."""
    vector_dtype: Literal["float32", "float16"] = "float32"
    """Storage of the vectors (and of the faiss index: float16 uses faiss's SQfp16)."""
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    """faiss index: flat (exact inner product), ivf (clustered cells, for large corpora) or hnsw (graph)."""
    nlist: int = 0
    """ivf: number of cells; 0 = 4 sqrt(chunks)."""
    nprobe: int = 16
    """ivf: cells visited per query (more = slower, closer to exact)."""
    hnsw_m: int = 32
    """hnsw: neighbours per node."""
    ef_search: int = 64
    """hnsw: candidate list size per query (more = slower, closer to exact)."""
    calibration_docs: int = 2000
    """Documents (the first ones streamed) whose mined pairs calibrate hybrid search's dense weight; 0 = plain RRF (weight 1)."""
    batch_size: int = 32
    """Chunks per forward pass."""
    part_docs: int = 1000
    """Documents per resumable part."""
    max_documents: int = 0
    """Embed only the first N documents (0 = all)."""
    step: int | None = None
    """Checkpoint step of the run; None = the latest."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda or cuda:N."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the model (vectors are normalised in float32)."""

    def __post_init__(self) -> None:
        require_at_least(self, 0, ("chunk_tokens", "chunk_stride", "max_chunks", "nlist", "max_documents",
                                    "calibration_docs"))
        require_at_least(self, 1, ("nprobe", "hnsw_m", "ef_search", "batch_size", "part_docs"))
        if self.chunk_tokens and self.chunk_stride > self.chunk_tokens:
            raise ValueError(f"chunk_stride ({self.chunk_stride}) must not exceed chunk_tokens ({self.chunk_tokens}): "
                             "a gap between chunks would never be embedded")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"splits: {bad} are not splits; use some of {', '.join(SPLITS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}")


def iter_corpus(data: list[str], splits: list[str]) -> Iterator[Document]:
    """Documents of a prepared dir's splits (canonical order) or of files/folders/globs."""
    from pilelm.data.readers import read_documents

    if len(data) == 1 and (Path(data[0]) / MANIFEST).is_file():
        prep = Path(data[0])
        if read_manifest(prep).get("stage") != "prepare":
            raise ValueError(f"{prep} is a `pilelm {read_manifest(prep).get('stage')}` output; "
                             "embed reads a prepared dir (pilelm prepare) or document files")
        files = [f for s in splits for f in split_files(prep, s)]
        if not files:
            raise FileNotFoundError(f"{prep} has no documents in splits {splits}")
        yield from read_documents(files)
        return
    yield from read_documents(data)


def _plan_key(cfg: EmbedConfig, encoder: TextEncoder) -> str:
    """What the parts depend on: a resumed run with another key starts over."""
    keys = ("data", "splits", "pooling", "chunk_tokens", "chunk_stride", "max_chunks", "part_docs", "max_documents")
    plan = {k: getattr(cfg, k) for k in keys}
    plan["encoder"] = encoder.identity.to_json() if encoder.identity else None
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _done_parts(parts: Path, key: str) -> int:
    """Whole parts already written for this plan (a part is whole once its vectors exist)."""
    plan = parts / "plan.json"
    if parts.is_dir() and (not plan.is_file() or json.loads(plan.read_text()).get("key") != key):
        log.warning("%s holds parts of another config or model: starting over", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan, {"key": key})
    n = 0
    while (parts / f"{n:05d}.npy").is_file():
        n += 1
    return n


def _write_part(parts: Path, n: int, docs: list[Document], encoder: TextEncoder, cfg: EmbedConfig) -> dict[str, int]:
    """Embed one part's documents; write its docs, chunks, and (last) vectors."""
    texts = [d.text for d in docs]
    ids = encoder.tokenize(texts)
    pieces: list[list[int]] = []
    doc_lines, chunk_lines = [], []
    empty = 0
    for d, row in zip(docs, ids, strict=True):
        spans = encoder.document_chunks(row, cfg.chunk_tokens, cfg.chunk_stride, cfg.max_chunks)
        if not spans:
            empty += 1
            continue
        doc_lines.append(json.dumps({"id": d.id, "component": d.component or "unknown", "chunks": len(spans)},
                                    ensure_ascii=False))
        for a, b in spans:
            pieces.append(row[a:b])
            chunk_lines.append(json.dumps({"doc": d.id, "text": encoder.tokenizer.decode(row[a:b])}, ensure_ascii=False))
    vectors = encoder.embed_ids(pieces, cfg.batch_size).astype(cfg.vector_dtype)
    for suffix, lines in ((".docs.jsonl", doc_lines), (".chunks.jsonl", chunk_lines)):
        with atomic_path(parts / f"{n:05d}{suffix}") as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with atomic_path(parts / f"{n:05d}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
    return {"documents": len(doc_lines), "chunks": len(pieces), "empty": empty,
            "tokens": sum(len(p) for p in pieces)}


def _merge_parts(parts: Path, n_parts: int, out: Path, dim: int, dtype: str) -> tuple[int, int]:
    """Concatenate the parts into vectors.npy, chunks.jsonl (+ offsets) and docs.jsonl."""
    sizes = [np.load(parts / f"{i:05d}.npy", mmap_mode="r").shape[0] for i in range(n_parts)]
    total = sum(sizes)
    with atomic_path(out / VECTORS) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(total, dim))
        at = 0
        for i, size in enumerate(sizes):
            mm[at : at + size] = np.load(parts / f"{i:05d}.npy")
            at += size
        mm.flush()
        del mm
    offsets = np.zeros(total, dtype=np.int64)
    docs = row = 0
    with atomic_path(out / CHUNKS) as chunk_tmp, atomic_path(out / DOCS) as doc_tmp:
        with open(chunk_tmp, "wb") as cf, open(doc_tmp, "wb") as df:
            for i in range(n_parts):
                chunk_lines = iter((parts / f"{i:05d}.chunks.jsonl").read_bytes().splitlines())
                # A part's chunks follow its documents' order, ``chunks`` lines per document.
                for line in (parts / f"{i:05d}.docs.jsonl").read_bytes().splitlines():
                    rec = json.loads(line)
                    rec["first_chunk"] = row
                    df.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
                    for _ in range(rec["chunks"]):
                        text = json.loads(next(chunk_lines))["text"]
                        offsets[row] = cf.tell()
                        cf.write(json.dumps({"doc": docs, "text": text}, ensure_ascii=False).encode() + b"\n")
                        row += 1
                    docs += 1
    with atomic_path(out / CHUNK_OFFSETS) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, offsets, allow_pickle=False)
    return docs, total


def run_embed(cfg: EmbedConfig) -> Path:
    if not cfg.run or not cfg.data or not cfg.output:
        raise ValueError("embed needs a run, data and an output: pilelm embed RUN_DIR --data PREPARED_DIR -o INDEX_DIR")
    out = Path(cfg.output)
    timer = Timer()
    encoder = TextEncoder.from_run(cfg.run, cfg.step, cfg.pooling, cfg.device, DTYPES[cfg.dtype])
    assert encoder.identity is not None
    if (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()  # an index being rebuilt is unfinished until its manifest is rewritten
    parts = out / PARTS
    done = _done_parts(parts, _plan_key(cfg, encoder))
    counts = {"documents": 0, "chunks": 0, "empty": 0, "tokens": 0}
    skip = done * cfg.part_docs
    if done:
        log.info("resuming after %d whole parts (%d documents)", done, skip)
    bar = tqdm(desc="embed", unit="doc", initial=skip, disable=None)
    buffer: list[Document] = []
    sample: list[tuple[str, str]] = []  # (text, component) of the first documents, for calibrate_fusion
    n_part = done
    t0 = time.perf_counter()
    with timer("embed"):
        for i, doc in enumerate(iter_corpus(cfg.data, cfg.splits)):
            if cfg.max_documents and i >= cfg.max_documents:
                break
            if len(sample) < cfg.calibration_docs:  # resumed runs sample the same documents
                sample.append((doc.text[:CALIBRATION_CHARS], doc.component or ""))
            if i < skip:
                continue
            buffer.append(doc)
            if len(buffer) == cfg.part_docs:
                for k, v in _write_part(parts, n_part, buffer, encoder, cfg).items():
                    counts[k] += v
                n_part += 1
                bar.update(len(buffer))
                buffer = []
        if buffer:
            for k, v in _write_part(parts, n_part, buffer, encoder, cfg).items():
                counts[k] += v
            n_part += 1
            bar.update(len(buffer))
    bar.close()
    elapsed = time.perf_counter() - t0
    if counts["empty"]:
        log.warning("skipped %d empty documents (no tokens)", counts["empty"])
    with timer("merge"):
        docs, chunks = _merge_parts(parts, n_part, out, encoder.dim, cfg.vector_dtype)
    if chunks == 0:
        raise ValueError(f"no document of {cfg.data} has any text to embed")
    with timer("index"):
        vectors = np.load(out / VECTORS, mmap_mode="r")
        write_faiss(build_faiss(vectors, cfg.index, cfg.vector_dtype, cfg.nlist, cfg.hnsw_m), out / FAISS)
    with timer("bm25"):
        bm25_files = build_bm25(out)
    with timer("calibrate"):
        fusion = calibrate_fusion(sample, encoder) if cfg.calibration_docs else {"dense_weight": 1.0, "pairs": 0}
    files = {name: content_hash(out / name) for name in HASHED_FILES} | bm25_files
    final = {"documents": docs, "chunks": chunks, "empty_documents_skipped": counts["empty"],
             "documents_embedded_this_run": counts["documents"], "tokens_this_run": counts["tokens"]}
    if elapsed > 0 and counts["documents"]:
        final["docs_per_s_this_run"] = round(counts["documents"] / elapsed, 2)
    write_manifest(out, "embed", cfg, inputs=[cfg.run, *cfg.data], counts=final, timings=timer.timings,
                   extra={"encoder": encoder.identity.to_json(), "dim": encoder.dim,
                          "max_tokens": encoder.max_tokens, "files": files, "fusion": fusion})
    shutil.rmtree(parts, ignore_errors=True)
    log.info("embedded %d documents as %d chunk vectors into %s", docs, chunks, out)
    return out
