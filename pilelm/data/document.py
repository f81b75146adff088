"""The unit every data step passes along: one document with its text and metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The Pile names each document's source in meta["pile_set_name"] (Gao et al. 2020, the
# released jsonl.zst shards); we keep that key as the component name everywhere.
COMPONENT_KEY = "pile_set_name"
# UTF-16 surrogates that JSON's \uXXXX escapes can smuggle into a str: not Unicode scalar
# values, so no UTF-8 encoder or tokenizer takes them.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Where pilelm records what it changed in a document (only present when something changed).
CHANGES_KEY = "pilelm"


@dataclass(slots=True)
class Document:
    """A document: ``id`` says where it came from (``file:line`` unless the data has ids),
    ``text`` is its content and ``meta`` its metadata, the component under ``pile_set_name``."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def component(self) -> str:
        return str(self.meta.get(COMPONENT_KEY, ""))

    def note_change(self, key: str, value: Any) -> None:
        """Record in ``meta["pilelm"]`` what a step changed (e.g. PII replaced per type)."""
        self.meta.setdefault(CHANGES_KEY, {})[key] = value

    def to_record(self) -> dict[str, Any]:
        """The Pile record: ``{"text": ..., "meta": {...}}``."""
        return {"text": self.text, "meta": self.meta}
