"""The chat format a fine-tuned model learns: role tokens, a template, and the vocabulary growth.

A conversation is rendered by ``SFT_CHAT_TEMPLATE`` (the layout of Zephyr, Tunstall et al.
2023: a role token on its own line, the message, the end-of-text token)::

    <|system|>\\nYou are terse.<|endoftext|>\\n<|user|>\\nWhat is the Pile?<|endoftext|>\\n
    <|assistant|>\\nAn 800 GB corpus.<|endoftext|>\\n

and the generation prompt is ``<|assistant|>\\n``. A reply therefore ends with the tokenizer's
own end-of-text token, the token `pilelm generate`, `pilelm serve` and transformers'
``generate`` already stop at. The three role tokens are added to the vocabulary as special
tokens (never split, dropped when decoding) and the template is stored as ``chat_template`` in
``tokenizer_config.json``, so transformers' ``apply_chat_template`` and ``pilelm serve``'s
``/v1/chat/completions`` (both through ``pilelm.tokens.chat.render_chat`` here) render the same
text and so the same ids.

New embedding rows start at the mean of the trained ones (Hewitt 2021, "Initializing New Word
Embeddings for Pretrained Language Models"): a random row can dwarf the trained logits, while
the mean keeps each new token's logit at the average and its input in the trained range.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import AddedToken

from pilelm.models import build_model
from pilelm.tokens.tokenizer import PileTokenizer, load_tokenizer

log = logging.getLogger(__name__)

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLES = ("system", "developer", "user", "assistant")
"""Roles a message may have; ``developer`` (OpenAI's newer name for system) renders as system."""

SFT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('a message role must be system, developer, user or assistant, not ' + role) }}"
    "{% endif %}"
    "{{ '<|' + role + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_tokenizer(base_dir: str | Path, out_dir: str | Path) -> tuple[PileTokenizer, list[int], int]:
    """The base tokenizer with the role tokens added and ``SFT_CHAT_TEMPLATE`` set, saved to
    ``out_dir``; returns it (reloaded, so its fast encoder knows the new tokens), the ids of
    the tokens that were new and the base vocabulary size."""
    base = load_tokenizer(base_dir)
    if base.eod_id is None:
        raise ValueError(f"{base_dir}: the tokenizer has no end-of-text token; a chat reply needs one to end with")
    before = base.hf.get_vocab(with_added_tokens=True)
    base.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS.values()])
    base.chat_template = SFT_CHAT_TEMPLATE
    base.save(out_dir)
    tok = load_tokenizer(out_dir)
    new = sorted(i for t, i in tok.hf.get_vocab(with_added_tokens=True).items() if t not in before)
    return tok, new, len(before)


def grow_vocabulary(model: nn.Module, cfg, new_ids: list[int], trained_rows: int) -> tuple[nn.Module, object]:
    """The model with rows for ``new_ids`` set to the mean of rows ``[0, trained_rows)``; when
    an id is past the embedding, a model with the vocabulary padded up to a multiple of 64
    (every old weight copied). Returns (model, config)."""
    from pilelm.training.trainer import round_vocab

    if new_ids and max(new_ids) >= cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=round_vocab(max(new_ids) + 1))
        bigger = build_model(cfg)
        old = model.state_dict()
        with torch.no_grad():
            for name, p in bigger.state_dict().items():
                p[: old[name].size(0)].copy_(old[name])  # the embedding and output rows grow
        model = bigger
    tables = {id(t): t for t in (model.wte.weight, model.lm_head.weight)}  # one when tied
    with torch.no_grad():
        for table in tables.values():
            table[new_ids] = table[:trained_rows].mean(dim=0)
    return model, cfg
