"""A tokenizer's identity: one fingerprint, and the one check that two tokenizers are the same.

Token ids mean something only with the tokenizer that made them: a model trained on one
tokenizer's ids reads another's as other tokens, silently. Every place that needs "the same
tokenizer" (``pilelm train`` with ``init_from``, ``pilelm eval`` on token shards, ``pilelm
tokenize`` resuming a split) asks ``require_same_tokenizer`` or compares fingerprints.

The fingerprint is SHA-256 over the canonical JSON (sorted keys, no whitespace) of what
decides which ids a text becomes and what pilelm does with them: the model (vocabulary,
merges or scores, unknown token, subword affixes), the normalizer, the pre-tokenizer, the
added tokens (content, id, matching flags) and the ids of the special roles pilelm uses
(eod, pad, mask, cls, sep). The decoder, post-processor and file formatting are left out,
so a tokenizer that is copied, saved again, exported to and imported from Hugging Face keeps
its fingerprint.

``pilelm tokenize`` records the fingerprint in its manifest (``extra.tokenizer.fingerprint``)
and ``pilelm tokenizer train`` in its own (``extra.fingerprint``); directories written before
it was recorded, and run directories, are fingerprinted from their ``tokenizer/`` folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pilelm.core.manifest import MANIFEST, read_manifest
from pilelm.tokens.tokenizer import PileTokenizer, load_tokenizer

ROLES = ("eod", "pad", "mask", "cls", "sep")
# Fields of an added token that change how text is matched to it.
_ADDED_TOKEN_FIELDS = ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")
_FORMAT = "pilelm-tokenizer-fingerprint-1"


def _canonical_model(model: dict[str, Any]) -> dict[str, Any]:
    model = dict(model)
    merges = model.get("merges")
    if isinstance(merges, list):
        # tokenizers writes a merge as "a b" (up to 0.19) or ["a", "b"] (after): the same merge.
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    return model


def tokenizer_fingerprint(tok: PileTokenizer) -> str:
    """The identity of ``tok`` (see the module docstring): 64 hex digits."""
    spec = json.loads(tok.hf.to_str())
    added = sorted(({k: a.get(k) for k in _ADDED_TOKEN_FIELDS} for a in spec.get("added_tokens") or []),
                   key=lambda a: (a["id"], a["content"]))
    payload = {
        "format": _FORMAT,
        "model": _canonical_model(spec.get("model") or {}),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added_tokens": added,
        "special_ids": {role: getattr(tok, f"{role}_id") for role in ROLES},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def recorded_fingerprint(stage_dir: str | Path) -> str | None:
    """The fingerprint a ``tokenize`` or ``tokenizer`` stage dir's manifest records, if any."""
    path = Path(stage_dir)
    if not (path / MANIFEST).is_file():
        return None
    manifest = read_manifest(path)
    extra = manifest.get("extra") or {}
    if manifest.get("stage") == "tokenize":
        return (extra.get("tokenizer") or {}).get("fingerprint")
    if manifest.get("stage") == "tokenizer":
        return extra.get("fingerprint")
    return None


def tokenizer_location(path: str | Path) -> Path:
    """The tokenizer that ``path`` stands for: its ``tokenizer/`` folder when it has one (a
    shard dir, a run dir), else ``path`` itself (a tokenizer dir or file)."""
    path = Path(path)
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def fingerprint_of(path: str | Path) -> str:
    """The fingerprint of the tokenizer of ``path``: a tokenizer dir or file, a shard dir or a
    run dir; what its manifest records, else computed from the tokenizer itself."""
    return recorded_fingerprint(path) or tokenizer_fingerprint(load_tokenizer(tokenizer_location(path), fast=False))


def require_same_tokenizer(a: str | Path, b: str | Path, what: str = "", fix: str = "") -> str:
    """Return the shared fingerprint of the tokenizers of ``a`` and ``b`` (anything
    ``fingerprint_of`` takes); raise a ValueError naming both and the fix when they differ.

    ``what`` names the check in the message (``init_from``, ``eval``); ``fix`` replaces the
    default advice, which is to tokenize the data again with ``a``'s tokenizer.
    """
    fa, fb = fingerprint_of(a), fingerprint_of(b)
    if fa == fb:
        return fa
    advice = fix or (f"tokenize the data with {a}'s tokenizer: pilelm tokenize PREPARED_DIR "
                     f"--tokenizer {tokenizer_location(a)} -o SHARD_DIR")
    raise ValueError(f"{what + ': ' if what else ''}{a} and {b} have different tokenizers "
                     f"(fingerprints {fa[:12]} and {fb[:12]}); {advice}")
