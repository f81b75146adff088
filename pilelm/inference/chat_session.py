"""A conversation with a chat model: history, context fitting, streamed replies; ``pilelm chat``.

``ChatSession`` keeps the messages (an optional system prompt, then user and assistant turns),
renders them with the run's chat template (``pilelm.tokens.chat``, the renderer
``/v1/chat/completions`` and fine-tuning use) and streams the reply. When the rendered
conversation and the reply's ``max_new_tokens`` would not fit the model's context, the oldest
user/assistant exchanges are dropped (the system prompt stays) until they do.

A base model's tokenizer has no chat template: chatting with it is refused with the way to get
one (``pilelm finetune RUN --task sft``), unless the plain ``User:`` / ``Assistant:``
transcript is asked for (``plain_template``), which a base model continues passably.

``pilelm chat RUN`` reads one user message per line from stdin (a prompt ``> `` on a terminal),
streams each reply to stdout, and understands ``/reset`` (forget the conversation) and
``/exit`` (or end of input).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TextIO

import torch.nn as nn

from pilelm.inference.generate import generate
from pilelm.inference.sampling import SamplingParams
from pilelm.tokens.chat import DEFAULT_CHAT_STOP, chat_template_of, load_special_tokens, render_chat

log = logging.getLogger(__name__)


DEFAULT_REPLY_TOKENS = 256
"""Most tokens of a reply by default (at most half the model's context)."""


class ChatSession:
    """A conversation: ``send(text)`` returns the reply (``on_text`` receives it as it streams)."""

    def __init__(self, model: nn.Module, tokenizer: Any, template: str | None, params: SamplingParams,
                 system: str = "", special_tokens: dict[str, str] | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        self.special_tokens = dict(special_tokens or {})
        if template is None:  # the plain transcript: the reply ends where the user's next turn starts
            params = replace(params, stop=[*params.stop, *DEFAULT_CHAT_STOP])
        self.params = params
        self.block_size = int(model.cfg.block_size)
        if params.max_new_tokens == 0:  # the default: a long reply that leaves half the context for the chat
            params = replace(params, max_new_tokens=min(DEFAULT_REPLY_TOKENS, self.block_size // 2))
        if params.max_new_tokens >= self.block_size:
            raise ValueError(f"max_new_tokens ({params.max_new_tokens}) must be below the model's context "
                             f"({self.block_size})")
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.history if history is None else history)

    def render(self, history: list[dict[str, str]]) -> str:
        return render_chat(self.messages(history), self.template, True, self.special_tokens)

    def fitted_prompt(self) -> str:
        """The conversation rendered, its oldest exchanges dropped until it and the reply fit."""
        history = list(self.history)
        room = self.block_size - self.params.max_new_tokens
        text = self.render(history)
        while len(self.tokenizer.encode(text)) > room and len(history) > 1:
            # Drop the oldest user message and the replies up to the next user message.
            cut = next((i for i in range(1, len(history)) if history[i]["role"] == "user"), len(history) - 1)
            history = history[cut:]
            text = self.render(history)
        if len(history) < len(self.history):
            log.info("dropped %d old message(s) to fit the context of %d tokens",
                     len(self.history) - len(history), self.block_size)
            self.history = history
        return text

    def send(self, text: str, on_text: Callable[[str], Any] | None = None) -> str:
        self.history.append({"role": "user", "content": text})
        prompt = self.fitted_prompt()
        stream = None if on_text is None else (lambda _row, delta: on_text(delta))
        reply = generate(self.model, self.tokenizer, [prompt], self.params, on_text=stream)[0]
        self.history.append({"role": "assistant", "content": reply.strip()})
        return reply


def open_session(run: str | Path, params: SamplingParams, system: str = "", plain_template: bool = False,
                 device: str = "auto", dtype: str = "auto", step: int | None = None) -> ChatSession:
    """A ``ChatSession`` on a run's latest (or ``step``) checkpoint."""
    from pilelm.models import spec_for
    from pilelm.models.dtypes import resolve_dtype
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    model, model_cfg, tok_dir = load_for_inference(run, step, device)
    if not spec_for(model_cfg).causal:
        raise ValueError(f"{run} holds a {type(model_cfg).__name__} model; chat needs a causal LM")
    tokenizer = load_tokenizer(tok_dir)
    template = chat_template_of(tokenizer, run, plain_template)
    model = model.to(resolve_dtype(dtype, next(model.parameters()).device))
    specials = {**tokenizer.special_tokens_map(), **load_special_tokens(tok_dir)}
    return ChatSession(model, tokenizer, template, params, system, specials)


@dataclass
class ChatConfig:
    run: str = ""
    """A run with a chat template (`pilelm finetune --task sft` output, or an imported chat model)."""
    system: str = ""
    """System prompt put before the conversation (kept when old turns are dropped)."""
    max_new_tokens: int = 0
    """Most tokens per reply; 0 = 256, or half the model's context if that is less."""
    temperature: float = 0.7
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no limit."""
    top_p: float = 0.95
    """Nucleus sampling mass (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL repetition penalty (> 1 discourages repeats; 1 = off)."""
    seed: int | None = None
    """Seed for reproducible replies; None = random."""
    plain_template: bool = False
    """Chat with a run that has no chat template through the plain 'User: / Assistant:' transcript."""
    step: int | None = None
    """Checkpoint step to load; None = the latest."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV-cache dtype; auto = bfloat16 where bf16 matmuls are native, else float32."""

    def __post_init__(self) -> None:
        self.sampling()

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed)


HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves"


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool) -> int:
    """Read messages from ``stdin`` until /exit or its end; returns the number of replies."""
    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        write(f"{HELP}\n")
    replies = 0
    while True:
        if interactive:
            write("> ")
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            write("(conversation reset)\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            write(f"{HELP}\n")
            continue
        session.send(text, on_text=write)
        write("\n")
        replies += 1
    return replies


def run_chat(cfg: ChatConfig) -> None:
    if not cfg.run:
        raise ValueError("chat needs a run: pilelm chat CHAT_RUN (a `pilelm finetune --task sft` output)")
    session = open_session(cfg.run, cfg.sampling(), cfg.system, cfg.plain_template, cfg.device, cfg.dtype, cfg.step)
    chat_loop(session, sys.stdin, sys.stdout, sys.stdin.isatty())
