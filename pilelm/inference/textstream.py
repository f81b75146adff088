"""Token ids of one completion in, text safe to show or send out: the one place that turns
generated tokens into streamed text (``pilelm generate`` and ``pilelm serve`` both use it).

Two things make a naive ``decode`` of each new token wrong while streaming:

- A byte-level BPE token can end in the middle of a UTF-8 character (an emoji is often 2-4
  tokens); ``IncrementalDecoder`` holds text back until the character is complete.
- A stop string can arrive split over several tokens (``"\\n\\n"`` as two ``"\\n"``).
  ``CompletionText`` holds back text that could be the start of a stop string until the next
  token decides it, so a reader never receives any part of a stop string (what the OpenAI API
  promises: the returned text "will not contain the stop sequence").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (``pilelm.tokens.tokenizer.PileTokenizer`` has it)."""

    eod_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def clean_text(text: str) -> str:
    """Normalise generated text: one newline convention, no trailing whitespace, no dangling
    replacement character from a UTF-8 sequence cut by the token limit."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip("\ufffd").rstrip()


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line -> the characters."""
    return re.sub(r"\\[ntr\\]", lambda m: _ESCAPES[m.group()], text)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class IncrementalDecoder:
    """Token ids in, text deltas out, with special tokens dropped.

    Decodes a short window of recent tokens (not the whole output) and holds text back while
    it ends in U+FFFD, i.e. while a byte-level token sequence is in the middle of a UTF-8
    character; the same windowing TGI and vLLM use for streaming.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _window(self) -> tuple[str, str]:
        """(the text of the window's tokens already returned, the text of the whole window)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        return prefix, decode(self.ids[self.prefix_offset :], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix, text = self._window()
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def finish(self) -> str:
        """The text still held back when the output ends; a character whose bytes were cut by
        the token limit is dropped rather than returned as U+FFFD."""
        prefix, text = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :].rstrip("\ufffd")


class CompletionText:
    """The streamed text of one completion: ``push`` each new token, ``finish`` at the end.

    Both return the text delta to send (possibly empty). ``stopped`` turns True when a stop
    string appeared; the text before it has then all been returned and later tokens are ignored.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = list(stop)
        self.held = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        """The text still held back when the completion ends (see ``IncrementalDecoder.finish``)."""
        return self._release(self.decoder.finish(), final=True)

    def _release(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.held + delta
        cut, hit = cut_at_stop(text, self.stop)
        if hit:
            self.stopped, self.held = True, ""
            return cut
        keep = 0 if final else stop_prefix_length(text, self.stop)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]
