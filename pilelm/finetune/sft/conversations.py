"""Conversations to learn from: users' JSONL files, or examples mined from documents.

A record of a JSONL file (plain or ``.zst``) is either

- ``{"prompt": ..., "response": ..., "system"?: ...}``: one user turn and the reply, or
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI's chat shape): roles system,
  developer, user, assistant; every assistant message is a reply the model learns.

Bad input, as documented in docs/sft.md: a record with neither shape, a message that is not a
``{role, content}`` object with string content, or an unknown role is an error naming the file
and line; a conversation whose replies are all empty is skipped and counted
(``empty_response``), as is one with no assistant message (``no_reply``).

Mined examples (``sft.examples``) come from Pile-format documents (the bundled sample, a
prepared directory, document files), no download needed:

- ``lead``: an encyclopedia entry's body without its first sentence -> that sentence (the
  "lead" summary, as news summarisation's lead baseline; See et al. 2017, sec. 5);
- ``title``: a text whose first paragraph is a short title line -> the title;
- ``dialogue``: a StackExchange question -> its first answer, as a user and an assistant turn.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilelm.data.readers import read_documents
from pilelm.evaluation.retrieval import STACKEXCHANGE, qa_pair
from pilelm.finetune.records import DataError, iter_json_records
from pilelm.finetune.sft.chat_format import ROLES

MINED = ("lead", "title", "dialogue")
LEAD_PROMPT = "Summarize the text in one sentence.\n\n"
TITLE_PROMPT = "Write a title for the text.\n\n"
MIN_PARAGRAPH = 40  # shorter paragraphs under a title are part-of-speech or pronunciation lines
MIN_SOURCE = 80  # a text shorter than this has too little to summarise or title
MAX_TITLE = 80
_SENTENCE = re.compile(r"^(.{20,}?[.!?])(?:\s+(?=[A-Z\"“(])|$)", re.S)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]
    where: str
    """``file:line`` of the record (of the document, for mined examples)."""

    @property
    def reply_index(self) -> int:
        """Index of the last assistant message: the reply evaluation compares against."""
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with a string content")
            if m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}].role is {m.get('role')!r}; "
                                f"use one of {', '.join(ROLES)}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "prompt" in record and "response" in record:
        prompt, response, system = record["prompt"], record["response"], record.get("system")
        if not isinstance(prompt, str) or not isinstance(response, str) or not isinstance(system, str | None):
            raise DataError(f"{where}: prompt, response (and system) must be strings")
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise DataError(f"{where}: a record needs prompt and response, or messages (have {', '.join(record)})")


def checked(messages: list[dict[str, str]], where: str, counts: Counter[str]) -> Conversation | None:
    """The conversation, or None (counted) when it has no non-empty reply."""
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        counts["no_reply"] += 1
        return None
    if not any(m["content"].strip() for m in replies):
        counts["empty_response"] += 1
        return None
    return Conversation(tuple(messages), where)


def read_conversations(path: Path, counts: Counter[str]) -> list[Conversation]:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if not path.name.endswith((".jsonl", ".jsonl.zst", ".json")):
        raise DataError(f"{path}: conversations are JSONL (.jsonl or .jsonl.zst); set sft.examples to mine "
                        "documents instead")
    out = []
    for where, record in iter_json_records(path):
        conv = checked(_messages(record, where), where, counts)
        if conv is not None:
            out.append(conv)
    return out


# --- mined from documents -------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def title_of(paras: list[str]) -> str | None:
    """The first paragraph when it is a title: one short line without a closing period."""
    head = paras[0] if paras else ""
    if len(paras) > 1 and "\n" not in head and 0 < len(head) <= MAX_TITLE and not head.endswith((".", ":", "?")):
        return head
    return None


def lead_pair(text: str) -> tuple[str, str] | None:
    """(body without its first sentence, that sentence) of an entry, or None."""
    paras = paragraphs(text)
    if title_of(paras) is not None:
        paras = paras[1:]
    body = [p for p in paras if len(p) >= MIN_PARAGRAPH]
    if not body:
        return None
    lead = re.sub(r"^\d+\.\s+", "", body[0])  # "1. " of a numbered sense
    m = _SENTENCE.match(lead)
    if m is None:
        return None
    first = m.group(1).strip()
    rest = "\n\n".join([lead[m.end():].strip(), *body[1:]]).strip()
    return (rest, first) if len(rest) >= MIN_SOURCE else None


def mined_conversation(kind: str, text: str, component: str) -> list[dict[str, str]] | None:
    if kind == "dialogue":
        pair = qa_pair(text) if component == STACKEXCHANGE else None
        return None if pair is None else [{"role": "user", "content": pair[0]},
                                          {"role": "assistant", "content": pair[1]}]
    if kind == "title":
        paras = paragraphs(text)
        title = title_of(paras)
        body = "\n\n".join(paras[1:])
        if title is None or len(body) < MIN_SOURCE:
            return None
        return [{"role": "user", "content": TITLE_PROMPT + body}, {"role": "assistant", "content": title}]
    pair = lead_pair(text) if component.startswith("Wikipedia") else None
    return None if pair is None else [{"role": "user", "content": LEAD_PROMPT + pair[0]},
                                      {"role": "assistant", "content": pair[1]}]


def mine_conversations(kind: str, files: Iterable[str | Path], counts: Counter[str]) -> list[Conversation]:
    """The ``kind`` examples of Pile-format documents; documents that give none are counted."""
    if kind not in MINED:
        raise ValueError(f"sft.examples must be one of {', '.join(MINED)}, got {kind!r}")
    out = []
    for doc in read_documents(list(files)):
        messages = mined_conversation(kind, doc.text, doc.component)
        if messages is None:
            counts[f"documents_without_{kind}"] += 1
            continue
        conv = checked(messages, doc.id, counts)
        if conv is not None:
            out.append(conv)
    return out
