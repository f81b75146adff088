"""GGUF export (``pilelm export --format gguf``): the file read back with ``gguf.GGUFReader``
holds every tensor with its shape and type, the metadata llama.cpp reads and the tokenizer;
and llama.cpp's graphs (gpt2, gptneox, qwen3), written out in torch from the file's tensors,
give pilelm's logits. Running the file in llama.cpp itself is ``benchmarks/gguf_llamacpp.py``."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from pilelm.core.cli import main as cli_main  # noqa: E402
from pilelm.interop.gguf_export import write_gguf  # noqa: E402
from pilelm.interop.gguf_gpt import gguf_arch, gguf_tensors  # noqa: E402
from pilelm.models.gpt import GPT, GPTConfig  # noqa: E402
from pilelm.tokens.tokenizer import load_tokenizer  # noqa: E402

VARIANTS = {
    "gpt2": dict(arch="gpt2"),
    "gpt2-untied-nobias": dict(arch="gpt2", tie_embeddings=False, bias=False),
    "neox-pythia": dict(arch="neox"),  # parallel residual, rotary on a quarter, untied
    "neox-sequential-tied-nobias": dict(arch="neox", parallel_residual=False, tie_embeddings=True, bias=False,
                                        rotary_pct=0.5, rotary_base=500.0),
    # the cpu-10min recipe with a SwiGLU MLP: LayerNorm blocks written as qwen3's RMSNorm
    "qknorm-swiglu": dict(arch="neox", rotary_pct=1.0, parallel_residual=False, bias=False, tie_embeddings=True,
                          qk_norm=True, mlp="swiglu"),
}


def random_gpt(vocab_size: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, d_model=64, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if p.dim() == 2:
                p.mul_(4.0)  # larger activations: a wrong layout changes logits clearly
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return load_tokenizer(tiny_run / "tokenizer", fast=False)


def read(path: Path) -> tuple[dict, dict]:
    """(metadata {key: value}, tensors {name: ReaderTensor}) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = field.contents()
        else:
            meta[key] = field.contents()
    return meta, {t.name: t for t in reader.tensors}


def dequantized(t) -> torch.Tensor:
    """A reader tensor as fp32 in torch's (out, in) order."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))


# --- llama.cpp's graphs written out in torch (src/models/{gpt2,gptneox,qwen3}.cpp) --------------


def _rope_neox(x: torch.Tensor, n_rot: int, base: float) -> torch.Tensor:
    """ggml_rope_ext in neox mode on (T, nh, hs): rotate-half over the first n_rot dims."""
    T = x.size(0)
    inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float32) / n_rot)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv  # (T, n_rot/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot]
    return torch.cat((a * cos - b * sin, b * cos + a * sin, x[..., n_rot:]), dim=-1)


def _attention(q, k, v):  # (T, nh, hs) each
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return y.transpose(0, 1).reshape(q.size(0), -1)


def llama_cpp_forward(meta: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of token ids (T,) as llama.cpp computes them from the file (fp32)."""
    arch = meta["general.architecture"]
    nh, L = meta[f"{arch}.attention.head_count"], meta[f"{arch}.block_count"]
    x = w["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + w["position_embd.weight"][: len(ids)]
    if arch == "qwen3":
        eps = meta["qwen3.attention.layer_norm_rms_epsilon"]

        def norm(h, name):
            return F.rms_norm(h, (h.size(-1),), w[name + ".weight"], eps)
    else:
        eps = meta[f"{arch}.attention.layer_norm_epsilon"]

        def norm(h, name):
            return F.layer_norm(h, (h.size(-1),), w[name + ".weight"], w[name + ".bias"], eps)

    def lin(h, name):
        return F.linear(h, w[name + ".weight"], w.get(name + ".bias"))

    for i in range(L):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "qwen3":
            q, k, v = (lin(h, b + n).view(len(ids), nh, -1) for n in ("attn_q", "attn_k", "attn_v"))
            q, k = norm(q, b + "attn_q_norm"), norm(k, b + "attn_k_norm")
        else:
            q, k, v = lin(h, b + "attn_qkv").view(len(ids), 3, nh, -1).unbind(1)
        if arch != "gpt2":
            n_rot, base = meta[f"{arch}.rope.dimension_count"], meta[f"{arch}.rope.freq_base"]
            q, k = _rope_neox(q, n_rot, base), _rope_neox(k, n_rot, base)
        attn = lin(_attention(q, k, v), b + "attn_output")
        if arch == "gptneox" and meta["gptneox.use_parallel_residual"]:
            mlp_in, x = norm(x, b + "ffn_norm"), x + attn
        else:
            x = x + attn
            mlp_in = norm(x, b + "ffn_norm")
        if arch == "qwen3":
            m = lin(F.silu(lin(mlp_in, b + "ffn_gate")) * lin(mlp_in, b + "ffn_up"), b + "ffn_down")
        else:  # ggml_gelu is the tanh approximation
            m = lin(F.gelu(lin(mlp_in, b + "ffn_up"), approximate="tanh"), b + "ffn_down")
        x = x + m
    x = norm(x, "output_norm")
    return F.linear(x, w.get("output.weight", w["token_embd.weight"]))


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_file_holds_every_tensor_the_metadata_and_the_tokenizer(variant, tokenizer, tmp_path):
    model = random_gpt(tokenizer.vocab_size + 7, **VARIANTS[variant])  # rows past the tokenizer: padding
    cfg = model.cfg
    path = tmp_path / "m.gguf"
    info = write_gguf(path, model, cfg, tokenizer, "f16")
    meta, tensors = read(path)
    arch = gguf_arch(cfg)
    assert info["architecture"] == arch == meta["general.architecture"]
    assert arch == {"gpt2": "gpt2", "neox": "gptneox"}.get(cfg.arch) if not cfg.qk_norm else arch == "qwen3"
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.context_length"] == 32 and meta[f"{arch}.feed_forward_length"] == cfg.ffn_size
    expected = gguf_tensors(cfg, model.state_dict())
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert tuple(reversed(t.shape.tolist())) == tuple(want.shape), name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.dim() == 1 else gguf.GGMLQuantizationType.F16)
        exact = want if want.dim() == 1 else want.half().float()  # vectors F32, matrices F16-rounded
        torch.testing.assert_close(dequantized(t), exact, atol=0, rtol=0)
    # the tokenizer as llama.cpp's byte-level BPE, padded to the model's rows
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(types) == cfg.vocab_size
    vocab = tokenizer.hf.get_vocab()
    assert all(tokens[i] == text for text, i in vocab.items())
    eod = tokenizer.eod_id
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == eod
    assert types[eod] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and meta["tokenizer.ggml.add_bos_token"] is False
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) > 0 and all(len(m.split(" ")) == 2 for m in merges)
    assert tokenizer.hf.encode(merges[0].replace(" ", "")).ids  # merges are in the vocab's alphabet


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_graph_over_the_file_gives_pilelm_logits(variant, tokenizer, tmp_path):
    model = random_gpt(tokenizer.vocab_size, seed=1, **VARIANTS[variant])
    path = tmp_path / "m.gguf"
    write_gguf(path, model, model.cfg, tokenizer, "f32")
    meta, tensors = read(path)
    weights = {name: dequantized(t) for name, t in tensors.items()}
    ids = torch.randint(0, tokenizer.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
        theirs = llama_cpp_forward(meta, weights, ids)
    # gptneox: llama.cpp's tanh GELU where GPT-NeoX has the exact one
    atol = 2e-2 if gguf_arch(model.cfg) == "gptneox" else 1e-4
    assert ours.std() > 0.3  # logits that differ by position and token: a wrong layout shows
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)


def test_q8_0_matrices_are_within_half_a_step_of_each_block(tokenizer, tmp_path):
    model = random_gpt(tokenizer.vocab_size, **VARIANTS["qknorm-swiglu"])
    path = tmp_path / "m.gguf"
    write_gguf(path, model, model.cfg, tokenizer, "q8_0")
    meta, tensors = read(path)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, want in gguf_tensors(model.cfg, model.state_dict()).items():
        t = tensors[name]
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127  # Q8_0: one scale per 32 weights
        err = (dequantized(t).reshape(-1, 32) - blocks).abs()
        # half a step, plus up to 127 steps times the F16 rounding (2^-11) of the stored scale
        assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), name
        assert float(err.mean()) < float(step.mean()) * 0.3  # and not a looser format


@pytest.mark.parametrize("options, named", [
    (dict(arch="neox", rotary_pct=1.0, parallel_residual=False, bias=False, qk_norm=True), "model.mlp=swiglu"),
    (dict(arch="gpt2", logit_softcap=15.0), "logit_softcap"),
    (dict(arch="gpt2", mlp="relu2"), "relu2"),
    (dict(arch="gpt2", qk_norm=True), "arch=neox"),
    (dict(arch="neox", mlp="swiglu"), "qk_norm=true"),
    (dict(arch="neox", rotary_pct=0.5, parallel_residual=False, bias=False, qk_norm=True, mlp="swiglu"),
     "rotary_pct"),
])
def test_what_llama_cpp_cannot_express_is_refused_by_name_before_writing(options, named, tokenizer, tmp_path):
    model = random_gpt(tokenizer.vocab_size, **options)
    path = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=named):
        write_gguf(path, model, model.cfg, tokenizer)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_export_stage_writes_a_gguf_file_of_a_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert cli_main(["export", str(tiny_run), "--format", "gguf", "-o", str(out), "--gguf-type", "q8_0"]) == 0
    meta, tensors = read(out)
    assert meta["general.architecture"] == "gpt2" and meta["general.name"] == tiny_run.name
    assert "blk.1.ffn_down.weight" in tensors and "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert cli_main(["export", str(tiny_run), "--format", "gguf", "-o", str(tmp_path)]) == 1
    assert "writes one file" in capsys.readouterr().err
