import json

import pytest
import torch

from pilelm.models import build_model, config_from_spec, families, get_spec, model_spec, spec_for
from pilelm.models.bert import BertConfig
from pilelm.models.gpt import GPTConfig

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)


def test_the_shipped_families_are_registered():
    assert families() == ["gpt", "bert"]
    assert get_spec("gpt").config_cls is GPTConfig and get_spec("bert").config_cls is BertConfig
    with pytest.raises(ValueError, match="unknown model family 'llama'; known: gpt, bert"):
        get_spec("llama")
    with pytest.raises(ValueError, match="unknown model family"):
        config_from_spec({"family": "llama", "config": {}})
    with pytest.raises(TypeError, match="no model family has config type dict"):
        spec_for({})


@pytest.mark.parametrize("family", families())
def test_every_family_builds_round_trips_model_json_and_encodes(family):
    spec = get_spec(family)
    cfg = spec.config_cls(**TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, spec.model_cls)
    assert spec_for(cfg) is spec and spec_for(model) is spec
    saved = json.loads(json.dumps(model_spec(cfg)))  # what model.json holds
    assert saved["family"] == family
    assert config_from_spec(saved) == cfg
    assert spec.objective(cfg) in ("clm", "mlm", "mlm+nsp")
    assert spec.loss_normalisation in ("micro_batch_mean", "global_target_count")
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        h = model.eval().encode(ids)
    assert h.shape == (2, 8, 32)


@pytest.mark.parametrize("family", families())
def test_every_family_has_an_hf_adapter_that_maps_its_weights_both_ways(family):
    from pilelm.interop.adapter import HFAdapter
    from pilelm.interop.hf import adapter_for, config_from_hf

    spec = get_spec(family)
    adapter = adapter_for(family)
    assert isinstance(adapter, HFAdapter) and adapter.model_types
    cfg = spec.config_cls(**TINY, init_std=0.05)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    hf_state = adapter.to_hf(cfg, state)
    hf_cfg = adapter.hf_config(cfg, None, None, "float32")
    assert hf_cfg.model_type in adapter.model_types
    back_cfg = config_from_hf(hf_cfg.to_dict(), hf_state, "test")
    assert spec_for(back_cfg) is spec
    back = adapter.from_hf(back_cfg, hf_state, "test")
    for key, value in back.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert set(back) == {k for k in state if k in back}  # only our own keys
    assert set(state) - set(back) <= {"lm_head.weight"}  # a tied output layer is stored once


def test_the_objectives_name_the_collation_each_config_needs():
    assert get_spec("gpt").objective(GPTConfig()) == "clm"
    assert get_spec("bert").objective(BertConfig()) == "mlm"
    assert get_spec("bert").objective(BertConfig(nsp=True)) == "mlm+nsp"
    assert get_spec("bert").needs_special_tokens and not get_spec("gpt").needs_special_tokens
