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


@pytest.mark.parametrize("nsp", [False, True])
def test_bert_conversion_is_exact_both_ways(nsp):
    from pilelm.hf import bert_hf_config, bert_to_hf, config_from_hf
    from pilelm.models.bert import Bert, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, d_model=64, nsp=nsp, dropout=0.0)
    model = Bert(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_cls = transformers.BertForPreTraining if nsp else transformers.BertForMaskedLM
    hf = hf_cls(bert_hf_config(cfg, None, None, "float32")).eval()
    missing, unexpected = hf.load_state_dict(bert_to_hf(cfg, model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    hf.tie_weights()
    idx = torch.randint(0, 101, (2, 20))
    types = torch.randint(0, 2, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        ours = model(idx, token_type_ids=types, attention_mask=mask)[0]
        out = hf(input_ids=idx, token_type_ids=types, attention_mask=mask)
    theirs = out.prediction_logits if nsp else out.logits
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1, :15], theirs[1, :15], atol=1e-4, rtol=0)
    if nsp:
        torch.testing.assert_close(model.nsp_logits(idx, types, mask), out.seq_relationship_logits, atol=1e-4, rtol=0)
    hf_state = hf.state_dict()
    back_cfg = config_from_hf(hf.config.to_dict(), hf_state)
    assert back_cfg == cfg
    back = Bert(back_cfg).eval()
    from pilelm.hf import bert_from_hf

    back.load_state_dict(bert_from_hf(back_cfg, hf_state))
    with torch.no_grad():
        torch.testing.assert_close(back(idx, token_type_ids=types, attention_mask=mask)[0], ours, atol=1e-5, rtol=0)
