"""Chat templates: a list of messages in, the prompt text a model continues out.

``render_chat`` renders a Jinja chat template as ``transformers``'
``PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)`` does
(https://huggingface.co/docs/transformers/chat_templating; ``utils/chat_template_utils.py``):
an ``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code; here with a
time and size limit, ``template_sandbox``) with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, the globals
``raise_exception(message)`` and ``strftime_now(format)``, a ``tojson`` filter that does not
escape HTML, ``{% generation %}`` blocks (rendered as their body; nothing tracks them here),
and the variables ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None)
plus the tokenizer's special tokens (``bos_token``, ``eos_token``, ...). Messages are passed
as they are (transformers also copies a ``reasoning`` field to ``reasoning_content``; pilelm
does not).

A tokenizer has a template when its ``tokenizer_config.json`` holds ``chat_template`` (a
string, or a list of ``{"name", "template"}`` of which the one named ``default`` is used) or
a ``chat_template.jinja`` file lies beside it (where transformers saves it since 4.43).

A base model has none and gets ``DEFAULT_CHAT_TEMPLATE``, a plain transcript::

    You are terse.                 <- a system (or developer) message, as it is

    User: What is the Pile?

    Assistant: An 800 GB corpus.

    User: Who made it?

    Assistant:                     <- the generation prompt; the model continues " ..."

Each message ends with a blank line. A plain transcript rather than ChatML, because a model
pretrained on web text has seen dialogues written this way and has no special tokens to learn
for it; a base model then tends to write the user's next turn, so a server ends the reply at
``DEFAULT_CHAT_STOP`` ("\\nUser:"). Any other role is an error raised by the template.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes

from pilelm.tokens.template_sandbox import LimitedEnvironment, limits, render_limited

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ raise_exception('the plain chat template knows the roles system, developer, user and "
    "assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
DEFAULT_CHAT_STOP = ["\nUser:"]
"""Where a reply rendered with ``DEFAULT_CHAT_TEMPLATE`` ends: the model starting the user's turn."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The tokenizer's chat template, or None when it has none (a base model's tokenizer)."""
    d = Path(tokenizer_dir)
    config_path = d / "tokenizer_config.json"
    if config_path.is_file():
        try:
            template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        if isinstance(template, list):  # named templates (transformers' multi-template format)
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return None


def load_special_tokens(tokenizer_dir: str | Path) -> dict[str, str]:
    """The special tokens a template sees (``bos_token``, ``eos_token``, ...), as
    ``tokenizer_config.json`` names them."""
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def render_chat(messages: list[dict], template: str | None, add_generation_prompt: bool = True,
                special_tokens: dict | None = None, timeout_s: float | None = None,
                max_chars: int | None = None) -> str:
    """``messages`` rendered through ``template`` (None: ``DEFAULT_CHAT_TEMPLATE``), within
    ``timeout_s`` seconds and ``max_chars`` characters (None: no limit; ``template_sandbox``).

    Raises ``jinja2.TemplateError`` when the template is malformed, refuses the messages (its
    ``raise_exception``) or breaks a limit (``TemplateLimitError``)."""
    compiled = _compile(template if template is not None else DEFAULT_CHAT_TEMPLATE)
    with limits(timeout_s, max_chars):
        return render_limited(compiled, messages=messages, tools=None, documents=None,
                              add_generation_prompt=add_generation_prompt, **(special_tokens or {}))


# Stand-ins for special-token strings inside message text while the template renders: private
# use characters of planes 15-16 (U+F0000 on), at a base no character of the chat uses.
_PRIVATE_USE = (0xF0000, 0x10FFFD)


def encode_chat(tokenizer: Any, messages: list[dict], template: str | None, add_generation_prompt: bool = True,
                special_tokens: dict | None = None, timeout_s: float | None = None,
                max_chars: int | None = None) -> list[int]:
    """``messages`` rendered through ``template`` (``render_chat``) as token ids, where only the
    template's own text can be special tokens: a special token's string inside a message
    (``<|endoftext|>`` or a role marker typed by a user) encodes as text, as transformers' chat
    templates encode messages with ``split_special_tokens``. ``tokenizer`` needs ``encode``; one
    with ``special_strings`` and ``encode_plain`` (``PileTokenizer``) gets the protection.

    Each special string in the messages is swapped for a private-use character before the
    template runs, so every special string of the rendered text is the template's; the text
    between them gets the swapped strings back and encodes with ``encode_plain``."""
    specials: list[str] = list(getattr(tokenizer, "special_strings", []))
    if not specials:
        return tokenizer.encode(render_chat(messages, template, add_generation_prompt, special_tokens, timeout_s,
                                            max_chars))
    used = {ord(c) for text in _strings(messages) for c in text} | {ord(c) for c in template or ""}
    base = next((b for b in range(*_PRIVATE_USE, len(specials))
                 if b + len(specials) <= _PRIVATE_USE[1] and not any(b <= u < b + len(specials) for u in used)), None)
    if base is None:
        raise ValueError("the messages use every private-use character; cannot tell their text from the template's")
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    stand_in = {s: chr(base + i) for i, s in enumerate(specials)}
    back = {v: k for k, v in stand_in.items()}
    swapped = [{k: pattern.sub(lambda m: stand_in[m.group()], v) if isinstance(v, str) else v for k, v in m.items()}
               for m in messages]
    rendered = render_chat(swapped, template, add_generation_prompt, special_tokens, timeout_s, max_chars)
    restore = re.compile("|".join(re.escape(c) for c in back))
    ids: list[int] = []
    pos = 0
    for m in [*pattern.finditer(rendered), None]:
        text = rendered[pos : None if m is None else m.start()]
        if text:
            ids += tokenizer.encode_plain(restore.sub(lambda c: back[c.group()], text))
        if m is not None:
            ids += tokenizer.encode(m.group())  # the template's marker: its special id
            pos = m.end()
    return ids


def _strings(messages: list[dict]) -> list[str]:
    return [v for m in messages for v in m.values() if isinstance(v, str)]


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


class NoChatTemplate(ValueError):
    """The run's tokenizer has no chat template; the message says how to get one."""


def no_template_message(run: str | Path) -> str:
    return (f"{run} has no chat template (a base model: its tokenizer_config.json holds no chat_template). "
            f"Fine-tune it on conversations to get one: pilelm finetune {run} --task sft --data CHATS.jsonl "
            "-o CHAT_RUN (docs/sft.md), then chat with CHAT_RUN; or pass --plain-template to chat with the "
            "plain 'User: / Assistant:' transcript, which a base model continues without training")


def chat_template_of(tokenizer: Any, run: str | Path, plain_template: bool = False) -> str | None:
    """The tokenizer's template; None (the plain transcript) when ``plain_template`` allows it."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    if plain_template:
        return None
    raise NoChatTemplate(no_template_message(run))
