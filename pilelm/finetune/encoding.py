"""Texts and word sequences -> token ids with labels, and padded batches of them.

BERT examples are ``[CLS] tokens [SEP]``; GPT examples are the tokens alone (as transformers
feeds ``GPT2ForSequenceClassification``) and are padded on the right with the end-of-text id,
which transformers' config calls ``pad_token_id``. Long examples are truncated to
``max_length`` tokens.

Token tasks label the first sub-token of each word and ignore the rest (-100), the
convention of BERT's NER experiments (Devlin et al. 2019, section 5.3). A byte-level BPE
encodes every word with a leading space, so a word has the same tokens wherever it stands
(transformers' ``is_split_into_words`` with ``add_prefix_space=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pilelm.tokens.tokenizer import PileTokenizer

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    label: int | list[int]
    """A sequence task's label id, or a token task's label per position (-100 where ignored)."""
    words: int = 0
    """Token tasks: how many words kept a labelled position (the rest were truncated)."""


class TaskEncoder:
    def __init__(self, tokenizer: PileTokenizer, causal: bool, max_length: int):
        self.tok = tokenizer
        if not causal:
            if tokenizer.cls_id is None or tokenizer.sep_id is None:
                raise ValueError("an encoder (BERT) needs a tokenizer with [CLS] and [SEP] tokens")
            self.prefix, self.suffix = [tokenizer.cls_id], [tokenizer.sep_id]
            self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        else:
            self.prefix, self.suffix = [], []
            self.pad_id = tokenizer.eod_id if tokenizer.eod_id is not None else 0
        self.max_length = max_length
        self.room = max_length - len(self.prefix) - len(self.suffix)
        if self.room < 1:
            raise ValueError(f"max_length={max_length} leaves no room for tokens")
        self.word_prefix = " " if tokenizer.kind == "bpe" else ""
        self._word_ids: dict[str, list[int]] = {}

    def encode_text(self, text: str, label: int) -> Encoded:
        ids = self.tok.encode(text)[: self.room]
        return Encoded(self.prefix + ids + self.suffix, label)

    def word_pieces(self, words: list[str]) -> list[list[int]]:
        """Token ids of each word (cached: corpora repeat words)."""
        missing = [w for w in dict.fromkeys(words) if w not in self._word_ids]
        if missing:
            fallback = [self.tok.unk_id if self.tok.unk_id is not None else self.pad_id]
            for w, ids in zip(missing, self.tok.encode_batch([self.word_prefix + w for w in missing]), strict=True):
                self._word_ids[w] = ids or fallback
        return [self._word_ids[w] for w in words]

    def encode_words(self, words: list[str], labels: list[int] | None = None) -> Encoded:
        """Word-labelled sequence -> ids and a label on each word's first token; with no
        labels (inference) every first token gets 0, so predictions can be read back per word."""
        ids: list[int] = []
        lab: list[int] = []
        kept = 0
        for i, pieces in enumerate(self.word_pieces(words)):
            if len(ids) + len(pieces) > self.room:
                break
            ids += pieces
            lab += [labels[i] if labels is not None else 0] + [IGNORE] * (len(pieces) - 1)
            kept += 1
        ignore = [IGNORE] * len(self.prefix)
        return Encoded(self.prefix + ids + self.suffix, ignore + lab + [IGNORE] * len(self.suffix), kept)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B,) or (B, T)."""
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    token_task = isinstance(batch[0].label, list)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long) if token_task else torch.empty(len(batch), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        if token_task:
            labels[i, :n] = torch.tensor(e.label)
        else:
            labels[i] = e.label
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
