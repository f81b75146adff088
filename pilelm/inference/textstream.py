"""Token ids of one completion in, text safe to send to a client out.

Two things make a naive ``decode`` of each new token wrong while streaming:

- A byte-level BPE token can end in the middle of a UTF-8 character (an emoji is often 2-4
  tokens); ``generate.IncrementalDecoder`` holds text back until the character is complete.
- A stop string can arrive split over several tokens (``"\\n\\n"`` as two ``"\\n"``). Text that
  could be the start of a stop string is held back here until the next token decides it, so a
  client never receives any part of a stop string (what the OpenAI API promises: the returned
  text "will not contain the stop sequence").
"""

from __future__ import annotations

from collections.abc import Sequence

from pilelm.inference.generate import IncrementalDecoder, TextTokenizer, cut_at_stop


def stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


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
        """The text still held back when the completion ends; a character whose bytes were cut
        by the token limit is dropped rather than sent as U+FFFD."""
        d = self.decoder
        prefix = d.tokenizer.decode(d.ids[d.prefix_offset : d.read_offset], skip_special_tokens=True)
        text = d.tokenizer.decode(d.ids[d.prefix_offset :], skip_special_tokens=True)
        d.prefix_offset = d.read_offset = len(d.ids)
        return self._release(text[len(prefix) :].rstrip("\ufffd"), final=True)

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
