"""An index directory: chunk vectors, a faiss index over them, and the documents they come from.

Layout (``pilelm embed`` output):

    INDEX/manifest.json    stage "embed": config, the encoder's identity (run, weights and
                           tokenizer hashes, pooling), counts, and the hashes of the files below
    INDEX/vectors.npy      (chunks, dim) unit vectors, float32 or float16 (``np.load``, no pickle)
    INDEX/index.faiss      the faiss index over the same rows (inner product = cosine)
    INDEX/chunks.jsonl     one line per vector: {"doc": doc row, "text": the chunk's text}
    INDEX/chunk_offsets.npy  byte offset of each line of chunks.jsonl (read a chunk without the rest)
    INDEX/docs.jsonl       one line per document: {"id", "component", "first_chunk", "chunks"}

Kinds of faiss index (Johnson et al. 2019, "Billion-scale similarity search with GPUs"; the
faiss wiki's "Guidelines to choose an index"): ``flat`` is exact; ``ivf`` clusters the vectors
into ``nlist`` cells and visits ``nprobe`` of them per query; ``hnsw`` walks a navigable
small-world graph (Malkov & Yashunin 2018). float16 vectors use the scalar quantizer ``SQfp16``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pilelm.core.atomic import atomic_path
from pilelm.core.manifest import content_hash, require_stage

log = logging.getLogger(__name__)

VECTORS = "vectors.npy"
FAISS = "index.faiss"
CHUNKS = "chunks.jsonl"
CHUNK_OFFSETS = "chunk_offsets.npy"
DOCS = "docs.jsonl"
HASHED_FILES = (VECTORS, FAISS, CHUNKS, DOCS)
EMBED_HINT = "pilelm embed RUN_DIR --data PREPARED_DIR -o INDEX_DIR"


def import_faiss() -> Any:
    """faiss, without its loader's INFO lines about which CPU build it tried."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def faiss_factory(kind: str, dim: int, n: int, dtype: str, nlist: int = 0, hnsw_m: int = 32) -> str:
    """The ``faiss.index_factory`` string for an index kind over ``n`` vectors."""
    storage = "SQfp16" if dtype == "float16" else "Flat"
    if kind == "flat":
        return storage
    if kind == "ivf":
        # faiss wiki: nlist between 4 sqrt(n) and 16 sqrt(n); at least ~39 training points per cell.
        cells = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        return f"IVF{cells},{storage}"
    if kind == "hnsw":
        return f"HNSW{hnsw_m}" + (",SQfp16" if dtype == "float16" else "")
    raise ValueError(f"index must be flat, ivf or hnsw, got {kind!r}")


def build_faiss(vectors: np.ndarray, kind: str, dtype: str, nlist: int = 0, hnsw_m: int = 32,
                batch: int = 65536, seed: int = 0) -> Any:
    """A faiss index over the rows of ``vectors`` (a memmap is read ``batch`` rows at a time)."""
    faiss = import_faiss()
    n, dim = vectors.shape
    index = faiss.index_factory(dim, faiss_factory(kind, dim, n, dtype, nlist, hnsw_m), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 256 * 1024), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for s in range(0, n, batch):
        index.add(np.ascontiguousarray(vectors[s : s + batch], dtype=np.float32))
    return index


def search_one(index: Any, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss search of one query vector on one OpenMP thread. A single query has no work worth
    splitting: on the 2-core build machine a second thread made a flat search over 100k
    vectors of 384 dims 3.4x slower (p50 48 ms against 14 ms; benchmarks/embed_throughput.py).
    The setting is the calling thread's (OpenMP's nthreads-var) and is restored afterwards."""
    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
    finally:
        faiss.omp_set_num_threads(before)


def write_faiss(index: Any, path: Path) -> None:
    faiss = import_faiss()
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


@dataclass
class Hit:
    """One ranked document: its best chunk's score and text."""

    rank: int
    doc: int
    id: str
    component: str
    score: float
    chunk: int
    text: str

    def snippet(self, chars: int = 200) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= chars else flat[: chars - 1] + "…"

    def to_json(self, chars: int = 200) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "component": self.component, "score": round(self.score, 6),
                "chunk": self.chunk, "snippet": self.snippet(chars)}


class VectorIndex:
    """A finished index directory, opened for search (files checked against the manifest)."""

    def __init__(self, path: str | Path, verify: bool = True):
        faiss = import_faiss()
        self.path = Path(path)
        self.manifest = require_stage(self.path, "embed", what="index")
        hashes = self.manifest.get("extra", {}).get("files", {})
        for name in HASHED_FILES:
            f = self.path / name
            if not f.is_file():
                raise FileNotFoundError(f"index {self.path} lacks {name}; rebuild it with `{EMBED_HINT}`")
            if verify and name in hashes and content_hash(f) != hashes[name]:
                raise ValueError(f"index file {f} is corrupted (its hash differs from the manifest's); "
                                 f"rebuild the index with `{EMBED_HINT}`")
        try:
            self.faiss = faiss.read_index(str(self.path / FAISS))
        except RuntimeError as e:
            raise ValueError(f"index file {self.path / FAISS} cannot be read ({str(e).splitlines()[0]}); "
                             f"rebuild the index with `{EMBED_HINT}`") from e
        self.vectors = np.load(self.path / VECTORS, mmap_mode="r", allow_pickle=False)
        self.docs = [json.loads(line) for line in (self.path / DOCS).read_text(encoding="utf-8").splitlines()]
        self._by_id = {d["id"]: i for i, d in enumerate(self.docs)}
        self.chunk_doc = np.empty(len(self.vectors), dtype=np.int64)
        for i, d in enumerate(self.docs):
            self.chunk_doc[d["first_chunk"] : d["first_chunk"] + d["chunks"]] = i
        self._offsets = np.load(self.path / CHUNK_OFFSETS, allow_pickle=False)
        if self.faiss.ntotal != len(self.vectors) or len(self._offsets) != len(self.vectors):
            raise ValueError(f"index {self.path}: {FAISS} holds {self.faiss.ntotal} vectors, {VECTORS} "
                             f"{len(self.vectors)}, {CHUNK_OFFSETS} {len(self._offsets)}; rebuild it with `{EMBED_HINT}`")
        if hasattr(self.faiss, "nprobe"):
            self.faiss.nprobe = int(self.manifest["config"].get("nprobe", 16))
        hnsw = getattr(self.faiss, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = int(self.manifest["config"].get("ef_search", 64))

    @property
    def encoder(self) -> dict[str, Any]:
        """The identity of the encoder that made the vectors (see ``inference.text_encoder.EncoderIdentity``)."""
        return self.manifest.get("extra", {}).get("encoder", {})

    def __len__(self) -> int:
        return len(self.docs)

    def chunk_text(self, row: int) -> str:
        with open(self.path / CHUNKS, "rb") as f:
            f.seek(int(self._offsets[row]))
            return json.loads(f.readline())["text"]

    def doc_row(self, ref: str) -> int:
        """A document's row from its id (or ``row:N``)."""
        if ref in self._by_id:
            return self._by_id[ref]
        if ref.startswith("row:") and ref[4:].isdigit() and int(ref[4:]) < len(self.docs):
            return int(ref[4:])
        sample = ", ".join(d["id"] for d in self.docs[:3])
        raise ValueError(f"no document {ref!r} in index {self.path} (ids look like: {sample}; or give row:N, N < {len(self.docs)})")

    def doc_vector(self, row: int) -> np.ndarray:
        """A document's vector: the normalised mean of its chunks' vectors."""
        d = self.docs[row]
        v = np.asarray(self.vectors[d["first_chunk"] : d["first_chunk"] + d["chunks"]], dtype=np.float32).mean(0)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def search(self, query: np.ndarray, k: int = 10, exclude: int | None = None) -> list[Hit]:
        """The ``k`` best documents for a unit query vector; a document scores its best chunk."""
        want = k + (exclude is not None)
        fetch = min(len(self.vectors), max(4 * want, want + 16))
        while True:
            scores, rows = search_one(self.faiss, query, fetch)
            best: dict[int, tuple[float, int]] = {}
            for s, r in zip(scores[0], rows[0], strict=True):
                if r < 0:
                    continue
                doc = int(self.chunk_doc[r])
                if doc != exclude and doc not in best:
                    best[doc] = (float(s), int(r))
            if len(best) >= k or fetch >= len(self.vectors):
                break
            fetch = min(len(self.vectors), fetch * 4)
        hits = []
        for rank, (doc, (score, row)) in enumerate(list(best.items())[:k], start=1):
            d = self.docs[doc]
            hits.append(Hit(rank, doc, d["id"], d.get("component", ""), score,
                            row - d["first_chunk"], self.chunk_text(row)))
        return hits
