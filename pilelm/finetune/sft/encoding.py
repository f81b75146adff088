"""Conversations to token ids with a loss mask, and the batches the trainer steps on.

The ids of a conversation are the tokenizer's encoding of the whole rendered text, exactly
what transformers' ``apply_chat_template(messages, tokenize=True)`` gives. A reply's tokens
are found by rendering the conversation up to the reply with the generation prompt (its
length in tokens, ``a``) and up to the end of the reply (``b``): tokens ``[a, b)`` (the reply,
its end-of-text token and the newline after it) are trained, every other token is context
only. Both renderings must encode to prefixes of the whole; a template and tokenizer for
which they do not would train on ids the model never sees when it is prompted, so such a
conversation is refused (``unstable_boundary``).

Too long for ``max_length`` (or a prompt longer than ``prompt_room``, the room generation
leaves it at evaluation): tokens after the last reply are dropped (``tail_dropped`` when that
is enough), then the longest message before the last reply is cut from its end, at a token
boundary, until the conversation fits (``prompt_truncated``): a document to summarise keeps
its head, where the lead sentence's content is (See et al. 2017: the lead-3 baseline), and the
instruction before it stays whole. Cutting the rendered prompt from the left instead taught
the model to write an article's first sentence from its last paragraphs. Only when that
cannot make it fit are tokens cut from the left (the start of the prompt, never the reply);
a last reply that cannot fit with one token of prompt before it is skipped
(``response_too_long``). The counts are logged once per load, not once per example.

Batches: ``packed_rows`` groups examples into rows of at most ``length`` tokens (the
examples in a seeded order, each row filled until the next would not fit); a row's examples
are separated by segment ids, which the model turns into a block-diagonal causal mask with
positions restarting per example (``pilelm.models.gpt``), so packing changes no example's
loss. Unpacked, each row is one example padded on the right.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pilelm.finetune.sft.conversations import Conversation
from pilelm.tokens.chat import render_chat
from pilelm.tokens.tokenizer import PileTokenizer

IGNORE = -100


@dataclass(frozen=True)
class SftExample:
    ids: list[int]
    trained: list[bool]
    """Per token: is it a reply token (a target the loss sees)?"""
    prompt: str
    """The text before the last reply, with the generation prompt (what evaluation sends)."""
    reference: str
    """The last reply's text."""

    @property
    def n_trained(self) -> int:
        return sum(self.trained)


MAX_SHRINKS = 4  # re-encoding a cut text can merge differently: a few passes settle it


class ChatEncoder:
    def __init__(self, tokenizer: PileTokenizer, template: str, special_tokens: dict[str, str], max_length: int,
                 prompt_room: int = 0):
        self.tok, self.template, self.special, self.max_length = tokenizer, template, special_tokens, max_length
        self.prompt_room = prompt_room or max_length
        """Most tokens of an example's prompt (what evaluation generates from)."""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(messages, self.template, add_generation_prompt, self.special)

    def shorten(self, conv: Conversation) -> tuple[Conversation, bool]:
        """``conv`` with its longest message before the last reply cut from the end, until the
        whole fits ``max_length`` and the prompt ``prompt_room``; (conv, whether it was cut)."""
        messages = [dict(m) for m in conv.messages]
        last = conv.reply_index
        cut = False
        for _ in range(MAX_SHRINKS):
            whole = len(self.tok.encode(self.render(messages[: last + 1], False)))
            prompt = len(self.tok.encode(self.render(messages[:last], True)))
            over = max(whole - self.max_length, prompt - self.prompt_room)
            if over <= 0 or last == 0:
                break
            longest = max(range(last), key=lambda i: len(messages[i]["content"]))
            ids = self.tok.encode(messages[longest]["content"])
            keep = len(ids) - over
            if keep <= 0:
                break
            messages[longest]["content"] = self.tok.decode(ids[:keep]).rstrip()
            cut = True
        return (Conversation(tuple(messages), conv.where) if cut else conv), cut

    def encode(self, conv: Conversation, counts: Counter[str]) -> SftExample | None:
        conv, shortened = self.shorten(conv)
        if shortened:
            counts["prompt_truncated"] += 1
        messages = list(conv.messages)
        ids = self.tok.encode(self.render(messages, False))
        trained = [False] * len(ids)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.tok.encode(self.render(messages[:i], True))
            upto = self.tok.encode(self.render(messages[: i + 1], False))
            if ids[: len(head)] != head or ids[: len(upto)] != upto:
                counts["unstable_boundary"] += 1
                return None
            trained[len(head):len(upto)] = [True] * (len(upto) - len(head))
            spans.append((len(head), len(upto)))
        start, end = spans[-1]
        last = conv.reply_index
        example = SftExample(ids, trained, self.render(messages[:last], True), messages[last]["content"])
        if len(ids) <= self.max_length:
            return example
        if end - start + 1 > self.max_length:
            counts["response_too_long"] += 1
            return None
        cut = max(0, end - self.max_length)  # 0: dropping what follows the last reply was enough
        counts["prompt_cut_from_left" if cut else "tail_dropped"] += 1
        return SftExample(ids[cut:end], trained[cut:end], example.prompt, example.reference)


def packed_rows(lengths: list[int], length: int, seed: int) -> list[list[int]]:
    """Example indices per row: a seeded order, next-fit into rows of <= ``length`` tokens."""
    rows: list[list[int]] = []
    used = length + 1
    for i in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        if used + lengths[i] > length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def collate_rows(rows: list[list[SftExample]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """input_ids, targets (IGNORE where no loss) and, packed, segments: (B, T) each, T the
    longest row. An example of n ids gives n - 1 inputs (it predicts its own next tokens)."""
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for s, e in enumerate(row):
            n = len(e.ids) - 1
            inputs[r, pos:pos + n] = torch.tensor(e.ids[:-1])
            targets[r, pos:pos + n] = torch.tensor([t if keep else IGNORE for t, keep in zip(e.ids[1:], e.trained[1:],
                                                                                              strict=True)])
            segments[r, pos:pos + n] = s
            pos += n
    out = {"input_ids": inputs, "targets": targets}
    if packed:
        out["segments"] = segments
    return out
