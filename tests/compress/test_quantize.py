"""`pilelm quantize`: error bounds of the stored weights, the KV-cached decode path against the
quantized model's own full forward, and the round trip through the loader, generate and serve."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from pilelm.compress.quantize import QuantizeConfig, is_quantized, quantize_model, run_quantize
from pilelm.compress.quantized_linear import METHODS, QuantizedLinear
from pilelm.core import cli
from pilelm.inference.generate import GenerateConfig, SamplingParams, run_generate, stream_batch
from pilelm.models.cpu_kernels import RepackedLinear
from pilelm.models.gpt import GPT, GPTConfig
from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine
from pilelm.training.checkpoint import latest_checkpoint, load_for_inference


def _linear(seed: int = 0) -> RepackedLinear:
    torch.manual_seed(seed)
    lin = RepackedLinear(128, 96)
    with torch.no_grad():
        lin.weight[3] *= 20  # one row with a wide range: scales must be per row (group)
    return lin


@pytest.mark.parametrize("method", METHODS)
def test_dequantized_weights_are_within_half_a_step(method):
    lin = _linear()
    q = QuantizedLinear.from_linear(lin, method, group_size=32)
    err = (q.dequantize() - lin.weight).abs()
    if method == "int4-weight":
        step = q.scales.repeat_interleave(32, dim=1)  # (out, in): each weight's group scale
        levels = 16
    else:
        step = q.scales[:, None].expand_as(err)
        levels = 255
    assert torch.all(err <= step / 2 + 1e-6)
    # Guard: the step is the row's (group's) range over its levels, not something looser.
    assert torch.all(step <= (lin.weight.abs().amax(1, keepdim=True) * 2 / (levels - 1)) + 1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layer_multiplies_by_its_dequantized_weight(method, dtype):
    lin = _linear()
    q = QuantizedLinear.from_linear(lin, method, group_size=32).to(dtype)
    x = torch.randn(2, 5, 128)
    with torch.inference_mode():
        y = q(x.to(dtype)).float()
    want = x @ q.dequantize().T + q.bias
    # Weight-only: only the kernel's rounding; dynamic: also the activations' 8 bits.
    tol = 0.02 if method != "int8-dynamic" else 0.1
    tol *= 1 if dtype == torch.float32 else 3
    assert y.shape == (2, 5, 96)
    assert (y - want).abs().max() <= tol * want.abs().max()


def test_int4_rows_not_in_blocks_of_16_are_padded_for_the_kernel():
    # GPT-2's LM head has 50257 rows; the kernel tiles 16: zero rows pad its copy, outputs drop.
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 50)
    q = QuantizedLinear.from_linear(lin, "int4-weight", group_size=32)
    assert q.qweight.shape == (50, 32)  # the stored form is not padded
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = q(x)
    want = x @ q.dequantize().T + q.bias
    assert y.shape == (3, 50)
    assert (y - want).abs().max() <= 0.02 * want.abs().max()


def _greedy_full_forward(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_cached_decoding_of_a_quantized_model_matches_its_full_forward(method, arch):
    torch.manual_seed(0)
    cfg = GPTConfig(arch=arch, vocab_size=96, block_size=48, n_layer=2, n_head=4, d_model=64, tie_embeddings=False)
    model = GPT(cfg).eval()
    names = quantize_model(model, method, group_size=32)
    assert "lm_head" in names and len(names) == 2 * 4 + 1
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14]]  # left padded in one batch
    params = [SamplingParams(max_new_tokens=10, temperature=0.0)] * 3
    with torch.inference_mode():
        steps = list(stream_batch(model, prompts, params, eos_id=None))
    for row, prompt in enumerate(prompts):
        got = [s[row] for s in steps]
        assert got == _greedy_full_forward(model, prompt, 10)


def test_dynamic_int8_decoding_stays_close_to_its_full_forward():
    # Activation scales depend on what is multiplied together, so compare logits, not tokens.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=4, d_model=64)
    model = GPT(cfg).eval()
    quantize_model(model, "int8-dynamic")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        full, _ = model(ids)
        from pilelm.models.kv_cache import KVCache

        cache = KVCache(cfg, 1, 16, "cpu", torch.float32)
        model(ids[:, :-1], cache=cache, last_only=True)
        last, _ = model(ids[:, -1:], cache=cache, last_only=True)
    assert (last[0, -1] - full[0, -1]).abs().max() < 0.05 * full.abs().max()


@pytest.fixture(scope="module")
def quantized_runs(tiny_run: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {m: run_quantize(QuantizeConfig(run=str(tiny_run), output=str(root / m), method=m, group_size=32))
            for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_quantized_run_loads_through_the_one_loader_and_generates(quantized_runs, method, tiny_run):
    run = quantized_runs[method]
    ckpt = latest_checkpoint(run)
    spec = json.loads((ckpt / "model.json").read_text())
    assert spec["quantization"]["method"] == method
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin"))  # safetensors only
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtype = f.get_tensor("blocks.0.mlp.fc.qweight").dtype
    assert dtype == (torch.uint8 if method == "int4-weight" else torch.int8)
    base_bytes = (latest_checkpoint(tiny_run) / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < 0.6 * base_bytes
    model, _, _ = load_for_inference(run)
    assert is_quantized(model)
    texts: list[str] = []
    run_generate(GenerateConfig(run=str(run), prompt=["the quick"], sampling=SamplingParams(max_new_tokens=8, temperature=0.0)), texts.append)
    # The tiny run is fitted to "the quick brown fox ..."; 8 bits keep that, 4 bits nearly.
    assert "".join(texts).startswith("the quick brown" if method != "int4-weight" else "the quick")


def test_quantized_run_is_served(quantized_runs):
    cfg = ServeConfig(run=str(quantized_runs["int8-weight"]), dtype="bfloat16")
    engine = load_engine(cfg)
    engine.start()
    try:
        with BackgroundServer(create_app(engine, cfg)) as srv:
            r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                           json={"prompt": "the quick", "max_tokens": 6, "temperature": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(" brown")


def test_quantizing_a_quantized_run_is_refused(quantized_runs, tmp_path):
    with pytest.raises(ValueError, match="already quantized"):
        run_quantize(QuantizeConfig(run=str(quantized_runs["int8-weight"]), output=str(tmp_path / "q2")))


def test_exporting_a_quantized_run_says_what_to_export_instead(quantized_runs, tiny_run, tmp_path):
    from pilelm.interop.hf import ExportConfig, run_export

    with pytest.raises(ValueError, match=f"holds quantization int8-weight weights.*made from \\({tiny_run}\\)"):
        run_export(ExportConfig(run=str(quantized_runs["int8-weight"]), output=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_quantize_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tiny_run), "-o", str(out), "--method", "int4-weight", "--group-size", "32"]) in (0, None)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "quantize"
    capsys.readouterr()
    assert cli.main(["quantize", str(tiny_run), "-o", str(out), "--method", "int3"]) != 0
    assert "int8-weight" in capsys.readouterr().err
