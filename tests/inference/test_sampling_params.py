"""One SamplingParams: the sampling options are defined once, with one default set, and
generate's config and serve's requests both go through it (issue 30 item 2)."""

from __future__ import annotations

import dataclasses

import pytest

from pilelm.core.cli import command_help, parse_args
from pilelm.core.config import ConfigError, load_config, to_dict
from pilelm.core.stages import COMMANDS
from pilelm.inference.generate import GenerateConfig
from pilelm.inference.sampling import GENERATE_PRESET, SamplingParams
from pilelm.serve.chat import parse_chat_request
from pilelm.serve.schemas import GenerationFields, parse_completion_request

SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)}


def test_generate_embeds_sampling_params_and_defines_no_option_of_its_own():
    own = {f.name for f in dataclasses.fields(GenerateConfig)}
    assert not own & SAMPLING_KEYS and "sampling" in own
    assert GenerateConfig().sampling == GENERATE_PRESET
    assert GENERATE_PRESET != SamplingParams()  # the preset is the one place generate differs


def test_serve_requests_default_to_sampling_params_defaults():
    default = SamplingParams()
    fields = GenerationFields.model_fields
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        assert fields[key].default == getattr(default, key), key
    req = parse_completion_request({"prompt": "x"})
    assert req.sampling_params(default.max_new_tokens, []) == default
    chat, _ = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "temperature": 0.5})
    assert chat.sampling_params(7, ["\n"]) == dataclasses.replace(default, max_new_tokens=7, temperature=0.5,
                                                                  stop=["\n"])


def test_generate_takes_sampling_keys_flat_or_in_their_section():
    cls = GenerateConfig
    cmd = COMMANDS["generate"]
    path, overrides = parse_args(cmd, cls, ["RUN", "--temperature", "0", "--max-new-tokens", "8", "--stop", "\\n",
                                            "--stop", "END", "seed=3", "--num-samples", "2"])
    cfg = load_config(cls, path, overrides)
    assert cfg.sampling == dataclasses.replace(GENERATE_PRESET, temperature=0.0, max_new_tokens=8,
                                               stop=["\\n", "END"], seed=3)
    assert cfg.sampling_params().stop == ["\n", "END"] and cfg.num_samples == 2
    nested = load_config(cls, overrides={"sampling": {"top_p": 0.5}, "top_k": 4})
    assert (nested.sampling.top_p, nested.sampling.top_k, nested.sampling.temperature) == (0.5, 4, 0.8)
    assert load_config(cls, overrides=to_dict(cfg)) == cfg  # a manifest's config reloads
    with pytest.raises(ConfigError, match="top_p"):
        load_config(cls, overrides=["top_p=0"])
    with pytest.raises(ConfigError, match="log-probabilities"):
        load_config(cls, overrides=["logprobs=2"])
    text = command_help(cmd, cls)
    assert "temperature=0.8" in text and "max_new_tokens=128" in text
