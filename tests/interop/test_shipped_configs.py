"""Every shipped config, at tiny size, exports exactly to its transformers class; a model no
class computes exactly is refused before anything is written; fine-tunes (heads) and SFT runs
(chat template) of the recipe's Qwen3 form export too; Llama / Qwen3 folders import back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import make_tiny_run

from pilelm.core.cli import main
from pilelm.core.config import from_dict
from pilelm.training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "pilelm" / "configs"

EXPECTED = {  # docs/export.md's table
    "tiny": "GPT2LMHeadModel",
    "cpu-bench": "GPT2LMHeadModel",
    "cpu-10min": "Qwen3ForCausalLM",
    "gpt2-124m": "Qwen3ForCausalLM",
    "pythia-160m": "GPTNeoXForCausalLM",
    "bert-tiny": "BertForMaskedLM",
}

# The cpu-10min recipe's model section at tiny size (Qwen3's form).
RECIPE = {"rotary_pct": 1.0, "parallel_residual": False, "bias": False, "tie_embeddings": True,
          "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "qk_norm_gain": True}


def test_every_shipped_config_is_in_the_table():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def shipped_model_config(name: str, vocab_size: int):
    """The model section of a shipped config at test size: 2 layers, d=64, 4 heads."""
    train = from_dict(TrainConfig, yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    return train.family, replace(train.model_config, n_layer=2, d_model=64, n_head=4, block_size=64,
                                 vocab_size=vocab_size, dropout=0.0)


def _perturb(model: torch.nn.Module) -> None:
    """Non-trivial norms, gains and biases, so a dropped or misplaced one shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _save_run(run: Path, model: torch.nn.Module, cfg) -> Path:
    from pilelm.core import manifest
    from pilelm.training import checkpoint

    ckpt = run / "checkpoints" / checkpoint.step_dir_name(1)
    checkpoint.save_model(ckpt, model, cfg)
    checkpoint.mark_complete(ckpt)
    manifest.write_manifest(run, "train", {"model": {}})
    return run


def _wordpiece_run(run: Path) -> int:
    from pilelm.tokens.tokenizer_train import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog.", "pack my box with five dozen liquor jugs."] * 8
    train_tokenizer(texts, "wordpiece", vocab_size=120, min_frequency=1).save(run / "tokenizer")
    return 128


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_exports_exactly(name, tiny_run, tmp_path):
    from pilelm.models import build_model

    run = tmp_path / "run"
    if name == "bert-tiny":
        vocab = _wordpiece_run(run)
    else:
        (run / "tokenizer").mkdir(parents=True)
        (run / "tokenizer" / "tokenizer.json").write_bytes((tiny_run / "tokenizer" / "tokenizer.json").read_bytes())
        vocab = 320
    family, cfg = shipped_model_config(name, vocab)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _perturb(model)
    _save_run(run, model, cfg)
    hf_dir = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "-o", str(hf_dir)]) == 0
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == EXPECTED[name]
    idx = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 0.1  # a model that outputs nothing would pass vacuously
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [
    {"qk_norm": True},  # the recipe before Qwen3's form: parameter-free QK-norm, LayerNorm, GELU
    {**RECIPE, "logit_softcap": 15.0},
    {**RECIPE, "qk_norm_gain": False},  # its epsilon is the dtype's, not rms_norm_eps
])
def test_inexact_export_is_refused_before_anything_is_written(options, tiny_run, tmp_path, capsys):
    from pilelm.models.gpt import GPT, GPTConfig

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.json").write_bytes((tiny_run / "tokenizer" / "tokenizer.json").read_bytes())
    cfg = GPTConfig(arch="neox", vocab_size=320, n_layer=2, n_head=4, d_model=64, block_size=64, **options)
    _save_run(run, GPT(cfg), cfg)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "-o", str(out)]) == 1
    assert "cannot express" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory) -> Path:
    """A tiny run of the recipe's form fitted to the tiny texts."""
    return make_tiny_run(tmp_path_factory.mktemp("qwen3") / "run", arch="neox", n_head=4, block_size=128,
                         train_steps=60, model_options=RECIPE)


def test_recipe_run_greedy_decodes_alike_and_imports_back(qwen3_run, tmp_path):
    from test_hf import _hf_greedy, _our_greedy

    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["export", str(qwen3_run), "-o", str(hf_dir)]) == 0
    model, cfg, tok_dir = load_for_inference(qwen3_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = load_tokenizer(tok_dir).encode("the quick")
    ours = _our_greedy(model, prompt, 16)
    assert ours == _hf_greedy(hf, prompt, 16)
    assert main(["import", str(hf_dir), "-o", str(back_dir)]) == 0
    back, back_cfg, _ = load_for_inference(back_dir)
    assert back_cfg == cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["structured", "int8-weight"])
def test_compressed_recipe_runs_export_exactly_or_are_refused(method, qwen3_run, tmp_path, capsys):
    """Pruned heads keep a Qwen3 folder (its head_dim is free); quantized weights are refused."""
    from pilelm.training.checkpoint import load_for_inference

    out = tmp_path / "c"
    if method == "structured":
        assert main(["prune", str(qwen3_run), "-o", str(out), "--method", "structured", "heads=0.5",
                     "channels=0.25"]) == 0
    else:
        assert main(["quantize", str(qwen3_run), "-o", str(out), "--method", method]) == 0
    code = main(["export", str(out), "-o", str(tmp_path / "hf")])
    if method != "structured":
        assert code == 1 and "weights" in capsys.readouterr().err and not (tmp_path / "hf").exists()
        return
    assert code == 0
    model, cfg, _ = load_for_inference(out)
    assert cfg.n_head == 2 and cfg.attn_width < cfg.d_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", ["classify", "ner"])
def test_recipe_fine_tunes_export_with_their_heads(task, qwen3_run, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune"))
    from ft_helpers import DATA, write_classification

    from pilelm.finetune.model import load_task_model

    if task == "classify":
        files = [write_classification(tmp_path / f"{s}.jsonl", n, i) for i, (s, n) in
                 enumerate((("train", 64), ("val", 16)))]
        auto, name = transformers.AutoModelForSequenceClassification, "Qwen3ForSequenceClassification"
    else:
        files = [str(DATA / "tiny.conll")] * 2
        auto, name = transformers.AutoModelForTokenClassification, "Qwen3ForTokenClassification"
    out = tmp_path / "ft"
    assert main(["finetune", str(qwen3_run), "-o", str(out), "--task", task, "--data", str(files[0]),
                 "--val-data", str(files[1]), "loop.max_steps=6", "loop.eval_every=6", "loop.batch_size=8",
                 "loop.num_threads=1", "loop.tensorboard=false"]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "hf")]) == 0
    hf = auto.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == name
    ours = load_task_model(out / "best")
    ids = torch.randint(5, ours.trunk.cfg.vocab_size, (3, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = ours.head.pad_id  # right padding, as pilelm batches
    with torch.no_grad():
        a, b = ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    if a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_recipe_sft_run_exports_its_chat_template(qwen3_run, tmp_path):
    from pilelm.tokens.chat import load_chat_template, load_special_tokens, render_chat
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"repeat: {w}", "response": w}) + "\n"
                             for w in ("red cat", "blue dog", "sun moon", "green tree") * 4))
    sft = tmp_path / "sft"
    assert main(["finetune", str(qwen3_run), "-o", str(sft), "--task", "sft", "--data", str(pairs),
                 "loop.max_steps=4", "loop.eval_every=4", "loop.batch_size=4", "sft.eval_generations=0",
                 "loop.num_threads=1", "loop.tensorboard=false"]) == 0
    hf_dir = tmp_path / "hf"
    assert main(["export", str(sft), "-o", str(hf_dir)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    messages = [{"role": "user", "content": "repeat: sun tree"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    tok_dir = sft / "tokenizer"
    prompt = render_chat(messages, load_chat_template(tok_dir), True, load_special_tokens(tok_dir))
    assert load_tokenizer(tok_dir).encode(prompt) == list(ids) and len(ids) > 5
    model, _, _ = load_for_inference(sft)
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=0)


# --- import of models made by transformers itself ---------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen3-untied-head-dim"])
def test_import_a_llama_or_qwen3_folder_made_by_transformers_and_train_it(kind, tiny_run, tmp_path):
    from test_hf import _hf_greedy, _our_greedy, _save_hf_tokenizer

    from pilelm.training.checkpoint import load_for_inference

    torch.manual_seed(0)
    vocab = 320
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=True)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        if kind != "qwen3":
            common.update(tie_word_embeddings=False, head_dim=24)
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    _perturb(hf)
    folder = tmp_path / "hf"
    hf.eval().save_pretrained(folder)
    _save_hf_tokenizer(tiny_run, folder)
    run = tmp_path / "run"
    assert main(["import", str(folder), "-o", str(run)]) == 0
    model, cfg, _ = load_for_inference(run)
    assert cfg.norm == "rmsnorm" and cfg.qk_norm == (kind != "llama") and cfg.d_ff == 160
    idx = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    prompt = idx[0, :5].tolist()
    assert _our_greedy(model, prompt, 12) == _hf_greedy(hf, prompt, 12)
    # ... and trains further: a few steps lower the loss on a repeated batch.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_grouped_query_attention_is_refused_on_import():
    from pilelm.interop.hf import config_from_hf

    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=1, intermediate_size=96)
    with pytest.raises(ValueError, match="grouped-query attention"):
        config_from_hf(cfg.to_dict(), {}, "src")
