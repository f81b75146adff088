"""LoRA kept apart (lora.merge=false): `pilelm export` writes the base model plus a peft adapter,
and ``PeftModel.from_pretrained(base, OUT / "adapter")`` computes pilelm's fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_run
from ft_helpers import write_classification

from pilelm.core.cli import main
from pilelm.training import checkpoint as ckpt_io

FAST = ["loop.num_threads=1", "loop.tensorboard=false"]
LORA = ["lora.r=4", "lora.alpha=8", "lora.merge=false", "optim.lr=1e-2"]
QWEN3 = {"rotary_pct": 1.0, "parallel_residual": False, "bias": False, "tie_embeddings": True,
         "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "qk_norm_gain": True}
FORMS = {"gpt2": {"arch": "gpt2"}, "neox": {"arch": "neox"},
         "qwen3": {"arch": "neox", "n_head": 4, "model_options": QWEN3}}


def _pairs(path: Path) -> Path:
    words = "sun tree dog cat red blue".split()
    rows = [{"prompt": f"repeat: {a} {b}", "response": f"{a} {b}"} for a in words for b in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trunk_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in state.items() if "embed" not in k and "wte" not in k and "lm_head" not in k}


@pytest.mark.parametrize("form", list(FORMS))
def test_sft_adapter_loads_in_peft_with_pilelm_logits(form, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_run(tmp_path / "base", block_size=64, **FORMS[form])
    ft = tmp_path / "ft"
    assert main(["finetune", str(base), "-o", str(ft), "--task", "sft", "--data", str(_pairs(tmp_path / "p.jsonl")),
                 "loop.max_steps=6", "loop.eval_every=3", "loop.batch_size=8", "sft.before=false",
                 "sft.eval_generations=2", "sft.max_new_tokens=8", *LORA, *FAST]) == 0
    ckpt = ckpt_io.resolve_checkpoint(ft)[1]
    assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "adapter.json").is_file()
    out, plain = tmp_path / "hf", tmp_path / "base_hf"
    assert main(["export", str(ft), "--format", "hf", "-o", str(out)]) == 0
    assert main(["export", str(base), "--format", "hf", "-o", str(plain)]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] == (form == "gpt2")
    # The exported base is the pretrained run's model (SFT's added role tokens aside).
    ours_base, pretrained = _trunk_weights(out), _trunk_weights(plain)
    assert ours_base.keys() == pretrained.keys()
    for k in pretrained:
        torch.testing.assert_close(ours_base[k], pretrained[k], atol=1e-6, rtol=0)

    hf_base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, hf_base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = hf_base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(hf_base, out / "adapter").eval()
        theirs = tuned(input_ids=ids).logits
        model, _, _ = ckpt_io.load_for_inference(ft)
        ours = model.eval()(ids)[0]
    assert (theirs - before).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # ...into pilelm's fine-tuned one


def test_classifier_adapter_loads_in_peft_with_pilelm_logits(tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from pilelm.finetune.model import load_task_model

    data = write_classification(tmp_path / "train.jsonl", 64, 0)
    ft = tmp_path / "ft"
    assert main(["finetune", str(tiny_run), "-o", str(ft), "--task", "classify", "--data", str(data),
                 "--val-data", str(write_classification(tmp_path / "val.jsonl", 16, 1)),
                 "loop.max_steps=6", "loop.eval_every=6", *LORA, *FAST]) == 0
    out = tmp_path / "hf"
    assert main(["export", str(ft), "-o", str(out)]) == 0
    hf_base = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.randint(5, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = hf_base(input_ids=ids).logits.clone()
        theirs = PeftModel.from_pretrained(hf_base, out / "adapter").eval()(input_ids=ids).logits
        ours = load_task_model(ft / "best")(ids, torch.ones_like(ids))
    assert (theirs - before).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
