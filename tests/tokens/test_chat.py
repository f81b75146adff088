"""pilelm.tokens.chat renders chat templates exactly as transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from pilelm.tokens.chat import (
    DEFAULT_CHAT_TEMPLATE,
    load_chat_template,
    load_special_tokens,
    render_chat,
)
from pilelm.tokens.tokenizer import load_tokenizer

# ChatML as Qwen/SmolLM ship it, plus what templates use: bos/eos, loop controls, namespace,
# tojson, raise_exception, a {% generation %} block, whitespace control.
CHATML = """{{ bos_token }}{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
{% if loop.index0 > 50 %}{% break %}{% endif %}
    <|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] | trim }}{% endif %}<|im_end|>
{% endfor %}
{%- set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant {{ {'turns': ns.n, 'html': '<b>&'} | tojson }}
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is the Pile?\n"},
    {"role": "assistant", "content": "An 800 GB corpus of 22 sources."},
    {"role": "user", "content": "Who made it? — café 🎉"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_run: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tiny_run / "tokenizer" / "tokenizer.json"),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CHATML], ids=["default", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_transformers_apply_chat_template(hf_tokenizer, template, add_generation_prompt):
    theirs = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    ours = render_chat(MESSAGES, template, add_generation_prompt,
                       special_tokens={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    assert ours == theirs
    assert "Who made it? — café 🎉" in ours


def test_default_template_is_the_documented_transcript():
    text = render_chat(MESSAGES, None)
    assert text == ("You are terse.\n\nUser:   What is the Pile?\n\n\nAssistant: An 800 GB corpus of 22 sources.\n\n"
                    "User: Who made it? — café 🎉\n\nAssistant:")
    assert render_chat(MESSAGES[:2], None, add_generation_prompt=False).endswith("Pile?\n\n\n")
    with pytest.raises(jinja2.TemplateError, match="robot"):
        render_chat([{"role": "robot", "content": "beep"}], None)


def test_templates_run_sandboxed():
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(MESSAGES, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: a template cannot edit the messages
        render_chat(MESSAGES, "{{ messages.append(1) }}")
    with pytest.raises(jinja2.TemplateSyntaxError):
        render_chat(MESSAGES, "{% for m in messages %}")


def test_load_chat_template_from_a_tokenizer_dir(tiny_run: Path, tmp_path: Path):
    tok_dir = tiny_run / "tokenizer"
    assert load_chat_template(tok_dir) is None  # a base model's tokenizer has none
    d = tmp_path / "with_template"
    load_tokenizer(tok_dir).save(d)
    assert load_chat_template(d) is None
    assert load_special_tokens(d) == {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    assert load_chat_template(d) == CHATML
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert load_chat_template(d) == CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert load_chat_template(d) == DEFAULT_CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_chat_template(d)
