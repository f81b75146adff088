from pathlib import Path

import pytest
import torch
import transformers

from pilelm.interop.gpt2_neox import gpt_config_from_hf, gpt_from_hf, gpt_hf_config, gpt_to_hf
from pilelm.interop.hf import config_from_hf
from pilelm.models.gpt import GPT, GPTConfig

# The default gpt2 / neox shapes go through the export and import stages below.
VARIANTS = {
    "gpt2-untied-nobias": dict(arch="gpt2", tie_embeddings=False, bias=False, d_ff=96),
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
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported; pilelm imports gpt2, gpt_neox, "
                                         "llama, qwen3, bert"):
        config_from_hf({"model_type": "mamba"}, {})


@pytest.mark.parametrize("nsp", [False, True])
def test_bert_conversion_is_exact_both_ways(nsp):
    from pilelm.interop.bert import bert_from_hf, bert_hf_config, bert_to_hf
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
    back.load_state_dict(bert_from_hf(back_cfg, hf_state))
    with torch.no_grad():
        torch.testing.assert_close(back(idx, token_type_ids=types, attention_mask=mask)[0], ours, atol=1e-5, rtol=0)


# --- the export / import stages ----------------------------------------------------------------


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _our_greedy(model, prompt: list[int], n: int) -> list[int]:
    from pilelm.inference.generate import SamplingParams, stream_batch

    return [s[0] for s in stream_batch(model, [prompt], [SamplingParams(n, temperature=0.0)], eos_id=None)]


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory):
    from conftest import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("neox") / "run", arch="neox", train_steps=60)


@pytest.mark.parametrize("which", ["gpt2", "neox"])
def test_export_loads_in_transformers_exactly_and_imports_back(which, tiny_run, neox_run, tmp_path):
    from pilelm.core.cli import main
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    run = tiny_run if which == "gpt2" else neox_run
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["export", str(run), "--format", "hf", "-o", str(hf_dir)]) == 0
    model, cfg, tok_dir = load_for_inference(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if which == "gpt2" else "GPTNeoXForCausalLM")
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)

    ours = load_tokenizer(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "the quick brown fox, a café in Zürich 🎉"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eod_id == hf.config.eos_token_id

    prompt = ours.encode("the quick")
    assert _our_greedy(model, prompt, 16) == _hf_greedy(hf, prompt, 16)

    assert main(["import", str(hf_dir), "-o", str(back_dir)]) == 0
    back, back_cfg, back_tok = load_for_inference(back_dir)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
    assert load_tokenizer(back_tok).encode(text) == ours.encode(text)
    assert back_cfg.arch == cfg.arch and back_cfg.tied == cfg.tied


def _save_hf_tokenizer(run: Path, folder: Path) -> None:
    """A transformers-made tokenizer folder (as on the hub) from the tiny run's tokenizer.json."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer" / "tokenizer.json"),
                                               eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(str(folder))


@pytest.mark.parametrize("which", ["gpt2-openai-layout", "pythia"])
def test_import_a_folder_made_by_transformers(which, tiny_run, tmp_path):
    """Random-init transformers models stand in for local GPT-2 / Pythia folders (offline)."""
    from safetensors.torch import load_file

    from pilelm.interop.hf import ImportConfig, run_import
    from pilelm.training.checkpoint import load_for_inference

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    vocab = 320
    if which == "pythia":  # Pythia's shape: rotary on a quarter of each head, parallel residual
        hf_cfg = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=256,
                                            max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000,
                                            use_parallel_residual=True, tie_word_embeddings=False)
        hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.eval().save_pretrained(folder)
    if which == "gpt2-openai-layout":
        # OpenAI's GPT-2 on the hub: a pytorch_model.bin, no "transformer." prefix, mask buffers.
        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
        torch.save(state, folder / "pytorch_model.bin")
    _save_hf_tokenizer(tiny_run, folder)
    run = run_import(ImportConfig(source=str(folder), output=str(tmp_path / "run")))
    model, cfg, _ = load_for_inference(run)
    idx = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    prompt = idx[0, :5].tolist()
    assert _our_greedy(model, prompt, 12) == _hf_greedy(hf, prompt, 12)


def test_bert_export_and_import(tmp_path):
    from pilelm.core import manifest
    from pilelm.interop.hf import ExportConfig, ImportConfig, run_export, run_import
    from pilelm.models.bert import Bert, BertConfig
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.tokens.tokenizer_train import train_tokenizer
    from pilelm.training import checkpoint

    run = tmp_path / "run"
    texts = ["the quick brown fox jumps over the lazy dog.", "pack my box with five dozen liquor jugs."] * 8
    train_tokenizer(texts, "wordpiece", vocab_size=120, min_frequency=1).save(run / "tokenizer")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, d_model=64, nsp=True)
    ckpt = run / "checkpoints" / checkpoint.step_dir_name(1)
    checkpoint.save_model(ckpt, Bert(cfg), cfg)
    checkpoint.mark_complete(ckpt)
    manifest.write_manifest(run, "train", {"model": {}})

    hf_dir = run_export(ExportConfig(run=str(run), output=str(tmp_path / "hf")))
    model, _, _ = checkpoint.load_for_inference(run)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = tok(["the quick [MASK] fox"], return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == load_tokenizer(run / "tokenizer").cls_id
    with torch.no_grad():
        ours = model(enc["input_ids"], token_type_ids=enc["token_type_ids"])[0]
        torch.testing.assert_close(ours, hf(**enc).logits, atol=1e-4, rtol=0)
    back = run_import(ImportConfig(source=str(hf_dir), output=str(tmp_path / "back")))
    again, again_cfg, _ = checkpoint.load_for_inference(back)
    assert again_cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(enc["input_ids"], token_type_ids=enc["token_type_ids"])[0], ours,
                                   atol=1e-5, rtol=0)


def test_exported_model_runs_under_lm_evaluation_harness(tiny_run, tmp_path, monkeypatch):
    """lm_eval --model hf on the shipped tiny task (offline), with the same log-likelihoods as
    pilelm computes for each choice."""
    from conftest import assert_lm_eval_matches_a_plain_forward, lm_eval_tiny_task

    from pilelm.interop.hf import ExportConfig, run_export

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval

    hf_dir = run_export(ExportConfig(run=str(tiny_run), output=str(tmp_path / "hf")))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["pilelm_tiny"], device="cpu",
        batch_size=4, bootstrap_iters=0, log_samples=True, task_manager=lm_eval_tiny_task(tmp_path),
    )
    assert_lm_eval_matches_a_plain_forward(results, tiny_run)
