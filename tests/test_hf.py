import pytest
import torch
import transformers

from pilelm.hf import gpt_config_from_hf, gpt_from_hf, gpt_hf_config, gpt_to_hf
from pilelm.models.gpt import GPT, GPTConfig

VARIANTS = {
    "gpt2": dict(arch="gpt2"),
    "gpt2-untied-nobias": dict(arch="gpt2", tie_embeddings=False, bias=False, d_ff=96),
    "neox": dict(arch="neox"),
    "neox-sequential-tied-nobias": dict(arch="neox", parallel_residual=False, tie_embeddings=True, rotary_pct=0.5,
                                        rotary_base=500.0, bias=False),
}


def random_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, d_model=64, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_class(arch: str):
    return transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.GPTNeoXForCausalLM


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_conversion_is_exact_both_ways(variant):
    model = random_gpt(**VARIANTS[variant])
    cfg = model.cfg
    hf = hf_class(cfg.arch)(gpt_hf_config(cfg, 0, 0, "float32")).eval()
    hf_state = gpt_to_hf(cfg, model.state_dict())
    hf_state = {"lm_head.weight" if k == "embed_out.weight" else k: v for k, v in hf_state.items()}
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or cfg.tied)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    back_cfg = gpt_config_from_hf(hf.config.to_dict())
    back = GPT(back_cfg).eval()
    back.load_state_dict(gpt_from_hf(back_cfg, hf.state_dict()), strict=not back_cfg.tied)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], theirs, atol=1e-4, rtol=0)


def test_unsupported_hf_configs_are_refused():
    with pytest.raises(ValueError, match="activation"):
        gpt_config_from_hf({"model_type": "gpt2", "activation_function": "relu"})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        gpt_config_from_hf({"model_type": "llama"})
