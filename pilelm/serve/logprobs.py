"""Token log-probabilities in the shapes of the OpenAI API.

Completions (legacy; https://platform.openai.com/docs/api-reference/completions/object):
``{"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
"text_offset": [int]}``, prompt tokens first when ``echo`` is set (the first one's entries
``null``: it has no context). ``top_logprobs`` holds the ``logprobs`` most likely tokens plus
the chosen one when it is not among them (as vLLM answers), so a reader can tell whether the
chosen token was the most likely (lm-evaluation-harness's ``is_greedy``).

Chat (https://platform.openai.com/docs/api-reference/chat/object):
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``;
``bytes`` are the token's own bytes, so a client can join the pieces of a split character.

A token's string is its own decoding (a byte-level token that holds part of a UTF-8 character
decodes to U+FFFD); ``text_offset`` is where its text starts in the choice's text (echoed
prompt included), counting whole characters as streaming emits them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pilelm.inference.logprobs import TokenLogprob
from pilelm.inference.textstream import IncrementalDecoder, TextTokenizer
from pilelm.tokens.fast_bpe import symbols_to_bytes


class CompletionLogprobs:
    """The completions ``logprobs`` object of one choice, built token by token."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.offset = 0
        self.whole: dict[str, list[Any]] = empty_completion_logprobs()

    def add(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, list[Any]]:
        """Append these tokens (an entry None: no log-probability, the prompt's first token);
        returns the fragment for them alone (a stream chunk's ``logprobs``)."""
        part = empty_completion_logprobs()
        for token, entry in zip(token_ids, entries, strict=True):
            part["tokens"].append(token_text(self.tokenizer, token))
            part["text_offset"].append(self.offset)
            self.offset += len(self.decoder.push(token))
            if entry is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
            else:
                part["token_logprobs"].append(entry.logprob)
                top = {token_text(self.tokenizer, t): lp for t, lp in entry.top}
                top.setdefault(part["tokens"][-1], entry.logprob)
                part["top_logprobs"].append(top)
        for key, values in part.items():
            self.whole[key] += values
        return part


def empty_completion_logprobs() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def chat_logprobs(tokenizer: TextTokenizer, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` items of these generated tokens."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}

    return [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


def token_text(tokenizer: TextTokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def token_bytes(tokenizer: TextTokenizer, token: int) -> bytes:
    """The token's own bytes: for a byte-level BPE the bytes its symbols stand for (so the
    pieces of a character split over tokens join into it), else its text in UTF-8."""
    hf = getattr(tokenizer, "hf", None)
    if getattr(tokenizer, "kind", None) == "bpe" and hf is not None:
        symbols = hf.id_to_token(token)
        raw = None if symbols is None else symbols_to_bytes(symbols)
        if raw is not None:
            return raw
    return token_text(tokenizer, token).encode("utf-8")
