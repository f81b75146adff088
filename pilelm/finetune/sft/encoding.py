"""Conversations to token ids with a loss mask, and the batches the trainer steps on.

The ids of a conversation are the tokenizer's encoding of the whole rendered text, exactly
what transformers' ``apply_chat_template(messages, tokenize=True)`` gives. A reply's tokens
are found by rendering the conversation up to the reply with the generation prompt (its
length in tokens, ``a``) and up to the end of the reply (``b``): tokens ``[a, b)`` (the reply,
its end-of-text token and the newline after it) are trained, every other token is context
only. Both renderings must encode to prefixes of the whole; a template and tokenizer for
which they do not would train on ids the model never sees when it is prompted, so such a
conversation is refused (``unstable_boundary``).

Too long for ``max_length``: tokens after the last reply are dropped (``tail_dropped`` when
that is enough), then tokens are cut from the left (the start of the prompt, never the reply)
and the conversation is counted as ``prompt_truncated``; a last reply that cannot fit with one token of prompt before it is
skipped (``response_too_long``).

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


class ChatEncoder:
    def __init__(self, tokenizer: PileTokenizer, template: str, special_tokens: dict[str, str], max_length: int):
        self.tok, self.template, self.special, self.max_length = tokenizer, template, special_tokens, max_length

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(messages, self.template, add_generation_prompt, self.special)

    def encode(self, conv: Conversation, counts: Counter[str]) -> SftExample | None:
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
        counts["prompt_truncated" if cut else "tail_dropped"] += 1
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
