"""Canaries: random secrets planted in the train split, the "secret sharer" test (Carlini,
Liu, Erlingsson, Kos & Song 2019, USENIX Security).

``pilelm prepare ... privacy.canaries=N`` draws N canaries per repetition count r in
``privacy.repetitions`` (default 1, 10, 100) from ``privacy.format`` (default "the account
number of customer {key} is {secret}": a random 4-letter key tells canaries apart, the
secret is random digits) and plants each in r distinct training documents, as a line of its
own at a random line boundary, so the copies land in different training windows.
``privacy.references`` (default N) more are drawn but never planted: the reference a model
has never seen. Everything is recorded in ``PREPARED/canaries.json`` (the input of ``pilelm audit``) and the manifest.

Planting runs after prepare's write stage, before the manifest, and rewrites the train shard
files that receive canaries. It stages every rewritten file under ``.work/canaries/`` first
and only then moves them into place, so a run killed at any point plants each copy exactly
once when it is rerun.
"""

from __future__ import annotations

import io
import json
import logging
import os
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from pilelm.core.atomic import atomic_write_bytes, atomic_write_json
from pilelm.data.canary_config import CanaryConfig
from pilelm.data.prepared import CANARIES, encode_record, iter_records, split_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Canary:
    id: str
    key: str
    secret: str
    text: str
    repetitions: int
    """Training documents that hold it; 0 = a reference canary, never planted."""

    @property
    def prefix(self) -> str:
        """The text before the secret (what extraction prompts with)."""
        return self.text[: self.text.index(self.secret)]


@dataclass(frozen=True)
class CanarySet:
    format: str
    secret_digits: int
    canaries: list[Canary]

    def render(self, key: str, secret: str) -> str:
        return self.format.format(key=key, secret=secret)

    def random_secrets(self, n: int, rng: np.random.Generator) -> list[str]:
        """n secrets drawn uniformly from the 10^digits possible ones."""
        digits = rng.integers(0, 10, size=(n, self.secret_digits))
        return ["".join(map(str, row)) for row in digits]

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "secret_digits": self.secret_digits,
                "canaries": [asdict(c) for c in self.canaries]}


def make_canaries(cfg: CanaryConfig) -> CanarySet:
    """The canaries of a config: ``cfg.canaries`` per repetition count, then the references
    (``cfg.references``, 0 = as many)."""
    rng = np.random.default_rng([cfg.seed, 0x43414E41])  # "CANA"
    empty = CanarySet(cfg.format, cfg.secret_digits, [])
    groups = [r for r in cfg.repetitions for _ in range(cfg.canaries)] + [0] * (cfg.references or cfg.canaries)
    n = len(groups)
    secrets = empty.random_secrets(n, rng)
    keys: list[str] = []
    while len(keys) < n:  # distinct keys: no two canaries share a prefix
        key = "".join(rng.choice(list(string.ascii_uppercase), 4))
        if key not in keys:
            keys.append(key)
    canaries = [Canary(f"c{i:04d}", key, secret, empty.render(key, secret), reps)
                for i, (key, secret, reps) in enumerate(zip(keys, secrets, groups, strict=True))]
    return CanarySet(cfg.format, cfg.secret_digits, canaries)


def load_canaries(path: str | Path) -> CanarySet:
    """A ``canaries.json`` written by ``pilelm prepare privacy.canaries=N``."""
    path = Path(path)
    if path.is_dir():
        path = path / CANARIES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no canaries file; run `pilelm prepare ... privacy.canaries=N` and "
                                f"pass PREPARED_DIR/{CANARIES}")
    try:
        d = json.loads(path.read_text())
        return CanarySet(d["format"], int(d["secret_digits"]), [Canary(**c) for c in d["canaries"]])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a canaries file ({e})") from None


def _insert_line(text: str, line: str, rng: np.random.Generator) -> str:
    lines = text.split("\n")
    at = int(rng.integers(0, len(lines) + 1))
    return "\n".join([*lines[:at], line, *lines[at:]])


def plant_canaries(cfg: CanaryConfig, prepared: Path, work: Path, compression_level: int = 3) -> dict[str, Any]:
    """Plant the canaries of ``cfg`` in ``prepared``'s train split; write ``canaries.json``;
    return the manifest record. (The hook ``prepare.canaries`` in ``pilelm.core.stages``.)"""
    canaries = make_canaries(cfg)
    files = split_files(prepared, "train")
    if not files:
        raise ValueError(f"{prepared} has no train documents to plant canaries in (privacy.canaries="
                         f"{cfg.canaries}); give training inputs or set privacy.canaries=0")
    stage = Path(work) / "canaries"
    done = stage / "done.json"
    if not done.is_file():
        _stage_files(canaries, files, stage, cfg.seed, compression_level)
    record = json.loads(done.read_text())
    for name in record["files"]:  # move the staged files into place (a rerun finishes the moves)
        staged = stage / name
        if staged.is_file():
            os.replace(staged, Path(prepared) / "train" / name)
    atomic_write_json(Path(prepared) / CANARIES, canaries.to_json())
    planted = sum(c.repetitions for c in canaries.canaries)
    log.info("planted %d canaries (%d copies) in %d train documents; references: %d; see %s",
             sum(c.repetitions > 0 for c in canaries.canaries), planted, record["documents"],
             sum(c.repetitions == 0 for c in canaries.canaries), Path(prepared) / CANARIES)
    return {"file": CANARIES, "per_group": cfg.canaries,
            "references": cfg.references or cfg.canaries, "repetitions": list(cfg.repetitions),
            "copies": planted, "documents": record["documents"], "format": cfg.format}


def _stage_files(canaries: CanarySet, files: list[Path], stage: Path, seed: int, level: int) -> None:
    counts = [sum(1 for _ in iter_records(f)) for f in files]
    total = sum(counts)
    copies = [c.text for c in canaries.canaries for _ in range(c.repetitions)]
    rng = np.random.default_rng([seed, 0x504C414E])  # "PLAN"
    # Distinct documents while there are enough (then a document may hold several copies).
    targets = rng.choice(total, size=len(copies), replace=len(copies) > total)
    order = rng.permutation(len(copies))
    by_doc: dict[int, list[str]] = {}
    for doc, i in zip(targets, order, strict=True):
        by_doc.setdefault(int(doc), []).append(copies[i])
    stage.mkdir(parents=True, exist_ok=True)
    names, first = [], 0
    for path, n in zip(files, counts, strict=True):
        if any(first <= d < first + n for d in by_doc):
            buf = io.BytesIO()
            with zstandard.ZstdCompressor(level=level).stream_writer(buf, closefd=False) as w:
                for k, record in enumerate(iter_records(path)):
                    text = record["text"]
                    for line in by_doc.get(first + k, []):
                        text = _insert_line(text, line, rng)
                    w.write(encode_record(text, record.get("meta") or {}))
            atomic_write_bytes(stage / path.name, buf.getvalue())
            names.append(path.name)
        first += n
    atomic_write_json(stage / "done.json", {"files": names, "documents": len(by_doc)})
