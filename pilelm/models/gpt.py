"""GPT-2 and GPT-NeoX/Pythia causal language models in one readable file.

The gpt family; two architectures (``model.arch``) share one block:
- ``gpt2`` (Radford et al. 2019): learned absolute positions, pre-LayerNorm, tanh-GELU MLP,
  sequential residual, output projection tied to the token embedding.
- ``neox`` (Black et al. 2022; Pythia, Biderman et al. 2023): rotary position embedding on
  the first ``rotary_pct`` of each head (rotate-half form), parallel residual
  ``x + attn(ln1(x)) + mlp(ln2(x))``, exact GELU, untied output projection.

Options of the quality-per-compute recipe (``pilelm/configs/cpu-10min.yaml``), each off by
default so the two architectures above stay exactly what transformers loads: ``qk_norm``
(RMSNorm of each head's queries and keys, Dehghani et al. 2023, "Scaling Vision
Transformers to 22B", sec. 3.1; allows higher learning rates; ``qk_norm_gain`` gives it
Qwen3's learnable gains), ``norm`` rmsnorm, ``mlp`` relu2 (squared ReLU, So et al. 2021,
"Primer") or swiglu (Shazeer 2020), ``logit_softcap`` and ``z_loss``
(``models/fused_ce.py``). ``tie_embeddings`` chooses the head. neox with rmsnorm, swiglu, full
rotary, no biases is Llama; with a gained QK-norm, Qwen3 (``interop/llama_qwen3.py``).

Shapes: B batch, T time, C = d_model, nh heads, hs = C // nh head size, V vocabulary.

Inference uses a ``KVCache`` (preallocated keys/values per layer) and optional per-row
``positions`` and a key mask, so left-padded batches of prompts decode together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.models.cpu_kernels import DECODE_MAX_ROWS, RepackedLinear, can_repack, repack_kind
from pilelm.models.dropout import Dropout, dropout
from pilelm.models.fused_ce import cross_entropy_with_z_loss, linear_cross_entropy, soft_cap
from pilelm.models.kv_cache import KVCache


@dataclass
class GPTConfig:
    arch: Literal["gpt2", "neox"] = "gpt2"
    """Architecture within the gpt family: gpt2 (learned positions, tied output) or neox (rotary, parallel residual)."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the token shards' tokenizer (rounded up to a multiple of 64)."""
    block_size: int = 256
    """Context length in tokens."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention heads per block."""
    d_model: int = 384
    """Residual stream width."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    head_dim: int = 0
    """Width of each attention head; 0 means d_model // n_head (other values come from pruning heads: pilelm prune)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output (0 for pretraining at scale)."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 and Pythia both use them)."""
    norm_eps: float = 1e-5
    """Epsilon of the block norms (and of the QK-norm when it has gains)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Block norms: layernorm (GPT-2, GPT-NeoX) or rmsnorm (learnable gain, no bias; Zhang &
    Sennrich 2019, as Llama / Qwen3)."""
    rotary_pct: float = 0.25
    """neox: fraction of each head's dimensions that get rotary embeddings (Pythia: 0.25)."""
    rotary_base: float = 10000.0
    """neox: rotary base frequency."""
    parallel_residual: bool = True
    """neox: x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residual adds."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the output projection; None = the arch's default (gpt2 yes, neox no)."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2 * n_layer)."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys before attention (and rotary)."""
    qk_norm_gain: bool = False
    """qk_norm with a learnable gain per head dimension (one for queries, one for keys, shared
    by the heads, initialised at 1) and epsilon norm_eps, the form of Qwen3's q_norm / k_norm;
    without it the QK-norm has no parameters (epsilon: the dtype's)."""
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    """MLP activation: gelu (the arch's: tanh-GELU for gpt2, exact for neox), relu2
    (squared ReLU) or swiglu (gated SiLU; d_ff=0 means 8/3 * d_model rounded up to 64)."""
    logit_softcap: float = 0.0
    """Soft-cap the output logits at this value (cap * tanh(z / cap), e.g. 15); 0 = off."""
    z_loss: float = 0.0
    """Training only: add this times logsumexp(logits)^2 to the loss (PaLM: 1e-4); 0 = off."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "neox"):
            raise ValueError(f"model.arch must be gpt2 or neox, got {self.arch!r}")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim must be >= 0 (0 = d_model // n_head), got {self.head_dim}")
        if not self.head_dim and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"model.rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm must be layernorm or rmsnorm, got {self.norm!r}")
        if self.qk_norm_gain and not self.qk_norm:
            raise ValueError("model.qk_norm_gain needs model.qk_norm=true")
        if self.mlp not in ("gelu", "relu2", "swiglu"):
            raise ValueError(f"model.mlp must be gelu, relu2 or swiglu, got {self.mlp!r}")
        if self.logit_softcap < 0 or self.z_loss < 0:
            raise ValueError("model.logit_softcap and model.z_loss must be >= 0 (0 = off)")
        if self.vocab_size < 0 or self.block_size < 1 or self.n_layer < 1:
            raise ValueError("model.vocab_size >= 0, model.block_size >= 1 and model.n_layer >= 1 are required")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def attn_width(self) -> int:
        """Width of all heads side by side (d_model unless heads were pruned)."""
        return self.n_head * self.head_size

    @property
    def ffn_size(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":  # the parameter count of a 4x MLP (Shazeer 2020, sec. 2)
            return -(-8 * self.d_model // 3 // 64) * 64
        return 4 * self.d_model

    @property
    def standard(self) -> bool:
        """No option that changes the forward pass is on: the model is a plain GPT-2 / GPT-NeoX
        (transformers can load it; the z-loss only changes training)."""
        return not (self.qk_norm or self.mlp != "gelu" or self.logit_softcap or self.norm != "layernorm")

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_pct) if self.arch == "neox" else 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), GPT-NeoX rotate-half layout."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dim = dim

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> (cos, sin), each (B, 1, T, dim); computed once per model forward."""
        freqs = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``cos.size(-1)`` dimensions of q, k (B, nh, T, hs)."""
    d = cos.size(-1)
    q_rot = q[..., :d] * cos + rotate_half(q[..., :d]) * sin
    k_rot = k[..., :d] * cos + rotate_half(k[..., :d]) * sin
    return torch.cat((q_rot, q[..., d:]), dim=-1), torch.cat((k_rot, k[..., d:]), dim=-1)


# Training on CPU at short context, causal attention written out (scores by one batched
# matmul that also adds the causal mask and the 1/sqrt(hs) scale, softmax, matmul) is faster
# forward+backward than SDPA's CPU flash kernel (docs/train.md: measured with
# benchmarks/train_throughput.py). Scores are rounded to the compute dtype before the softmax
# (as in an eager bf16 attention); the softmax accumulates in fp32. Its (B, nh, T, T) memory
# grows with T^2, so longer contexts keep SDPA.
CPU_EXPLICIT_ATTENTION_MAX_T = 512


def causal_attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention written out; q, k, v (B, nh, T, hs) -> (B, nh, T, hs).
    ``mask`` (B, 1, T, T) boolean, True = may attend, replaces the plain causal one (packed
    sequences: ``segment_mask``)."""
    B, nh, T, hs = q.shape
    if mask is None:
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).expand(B * nh, T, T)
    else:
        future = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        future = future.expand(B, nh, T, T).reshape(B * nh, T, T)
    scores = torch.baddbmm(future, q.reshape(B * nh, T, hs),
                           k.reshape(B * nh, T, hs).transpose(1, 2), alpha=hs**-0.5)  # (B*nh, T, T)
    att = torch.softmax(scores, dim=-1)
    if dropout_p:
        att = dropout(att, dropout_p)
    return (att @ v.reshape(B * nh, T, hs)).view(B, nh, T, hs)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = RepackedLinear(cfg.d_model, 3 * cfg.attn_width, bias=cfg.bias)
        self.proj = RepackedLinear(cfg.attn_width, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = Dropout(cfg.dropout)
        gain = (lambda: nn.Parameter(torch.ones(cfg.head_size))) if cfg.qk_norm_gain else (lambda: None)
        self.q_gain, self.k_gain = gain(), gain()  # Qwen3's q_norm / k_norm: shared by the heads
        self.qk_eps = cfg.norm_eps if cfg.qk_norm_gain else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.cfg.n_head, self.cfg.head_size
        q, k, v = self.qkv(x).split(nh * hs, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        if self.cfg.qk_norm:
            q = F.rms_norm(q, (hs,), self.q_gain, self.qk_eps)
            k = F.rms_norm(k, (hs,), self.k_gain, self.qk_eps)
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        drop = self.dropout if self.training else 0.0
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k = cache.k[layer, :, :, : start + T]  # (B, nh, S, hs), S = filled length
            v = cache.v[layer, :, :, : start + T]
            # The model built the mask: causal + padding for several tokens; for one new token,
            # which sees every filled position, padding only (None without padding).
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, dropout_p=drop).to(x.dtype)
        elif x.device.type == "cpu" and T <= CPU_EXPLICIT_ATTENTION_MAX_T and torch.is_grad_enabled():
            y = causal_attention_explicit(q, k, v, drop, mask)  # without a cache, a mask is a packing mask
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh * hs)
        y = self.proj(y)
        return self.resid_drop(y) if self.training else y

    def decode_one(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache,
                   layer: int, mask: torch.Tensor | None, kind: str | None) -> torch.Tensor:
        """``forward`` for one new token per row, flat (``GPT._decode_one``): x (B, C) -> (B, C);
        writes the token's key and value at ``cache.length``."""
        B, C = x.shape
        nh, hs = self.cfg.n_head, self.cfg.head_size
        S = cache.length + 1
        qkv = self.qkv.repacked_matmul(x, kind).view(B, 3, nh, 1, hs)
        if self.cfg.qk_norm:
            qkv = torch.stack((F.rms_norm(qkv[:, 0], (hs,), self.q_gain, self.qk_eps),
                               F.rms_norm(qkv[:, 1], (hs,), self.k_gain, self.qk_eps), qkv[:, 2]), dim=1)
        q = qkv[:, 0]  # (B, nh, 1, hs)
        if rope is None:
            cache.kv[layer, :, :, :, S - 1 : S] = qkv[:, 1:].transpose(0, 1)  # keys and values in one copy
        else:
            q, k = apply_rotary(q, qkv[:, 1], *rope)
            cache.kv[layer, 0, :, :, S - 1 : S] = k
            cache.kv[layer, 1, :, :, S - 1 : S] = qkv[:, 2]
        keys, values = cache.kv[layer, 0, :, :, :S], cache.kv[layer, 1, :, :, :S]  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask)
        return self.proj.repacked_matmul(y.to(x.dtype).view(B, nh * hs), kind)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. 2): 0.5 x (1 + tanh(u)),
    u = sqrt(2/pi) (x + 0.044715 x^3). Under torch.compile it is written as the identical
    x * sigmoid(2u), which compiles to one loop, faster than tanh on CPU; eager mode
    keeps aten's kernel (one pass; the sigmoid form would be several)."""
    if torch.compiler.is_compiling():
        return gelu_tanh_sigmoid_form(x)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), computed in fp32."""
    k = 2.0 * math.sqrt(2.0 / math.pi)
    xf = x.float()
    return (xf * torch.sigmoid(xf * (k + k * 0.044715 * xf * xf))).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        # swiglu: fc holds the gate's rows, then the value's: (2 * ffn, C).
        self.fc = RepackedLinear(cfg.d_model, cfg.ffn_size * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.proj = RepackedLinear(cfg.ffn_size, cfg.d_model, bias=cfg.bias)
        self.drop = Dropout(cfg.dropout)
        # GPT-2 used the tanh approximation ("gelu_new"); GPT-NeoX uses exact GELU.
        self.approximate = "tanh" if cfg.arch == "gpt2" else "none"

    def activation(self, h: torch.Tensor, fast_gelu: bool = True) -> torch.Tensor:
        if self.kind == "relu2":
            return F.relu(h).square()
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            return F.silu(gate) * value
        if self.approximate == "tanh" and fast_gelu:
            return gelu_tanh(h)
        return F.gelu(h, approximate=self.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.activation(self.fc(x)))
        return self.drop(h) if self.training else h

    def decode_one(self, x: torch.Tensor, kind: str | None) -> torch.Tensor:
        """``forward`` for one token per row in inference: x (B, C) -> (B, C)."""
        h = self.activation(self.fc.repacked_matmul(x, kind), fast_gelu=False)
        return self.proj.repacked_matmul(h, kind)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = block_norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = block_norm(cfg)
        self.mlp = MLP(cfg)
        self.parallel = cfg.arch == "neox" and cfg.parallel_residual

    def forward(self, x, rope, cache, layer, mask):
        if self.parallel:
            return x + self.attn(self.ln1(x), rope, cache, layer, mask) + self.mlp(self.ln2(x))
        x = x + self.attn(self.ln1(x), rope, cache, layer, mask)
        return x + self.mlp(self.ln2(x))

    def decode_one(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache,
                   layer: int, mask: torch.Tensor | None, kind: str | None) -> torch.Tensor:
        """``forward`` for one new token per row in inference, with the same weights and
        residual order, as plain calls: x (B, C) -> (B, C)."""
        y = self.attn.decode_one(_layer_norm(self.ln1, x), rope, cache, layer, mask, kind)
        if self.parallel:
            return x + y + self.mlp.decode_one(_layer_norm(self.ln2, x), kind)
        x = x + y
        return x + self.mlp.decode_one(_layer_norm(self.ln2, x), kind)


def block_norm(cfg: GPTConfig) -> nn.Module:
    """The norm before attention, before the MLP and after the last block."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def _layer_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ln(x)`` without the module call (hooks and dispatch cost more than the op at decode size)."""
    if isinstance(ln, nn.RMSNorm):
        return F.rms_norm(x, ln.normalized_shape, ln.weight, ln.eps)
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions counted from each segment's first token."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T) start of my segment
    return t - first


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) boolean attention mask: causal within a segment
    (True = may attend). Every query sees at least itself, so no row of scores is all -inf."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = block_norm(cfg)
        self.lm_head = RepackedLinear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rotary_base) if cfg.rotary_dim > 0 else None
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops position (and, when untied, input) embeddings,
        the count used in scaling-law and MFU formulas."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.cfg.tied:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12 * L * T * C (PaLM paper, appendix B)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * self.cfg.n_layer * T * self.cfg.d_model

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V) or (B, 1, V) if last_only, mean loss or None).

        targets (B, T) with -100 for ignored positions. With ``cache``, the T new tokens are
        appended after ``cache.length`` filled positions and attend to them, honouring
        ``cache.key_mask`` (left padding); ``positions`` (B, T) default to consecutive ones.
        ``return_logits=False`` with targets computes the loss chunk by chunk without the
        (B, T, V) logits (``models/fused_ce.py``; training) and returns None for them.

        ``segments`` (B, T) packs several sequences into one row (supervised fine-tuning): a
        token attends only to earlier tokens of its own segment (a block-diagonal causal mask)
        and positions restart at each segment's first token, so every packed sequence is
        computed as if it were alone (tests/models/test_gpt.py checks packed == separate).
        """
        B, T = idx.shape
        if cache is not None and T == 1 and not self.training and not torch.is_grad_enabled() and last_only:
            return self._decode_one(idx[:, 0], None if positions is None else positions[:, 0], cache)[:, None], None
        x = self._trunk(idx, cache, positions, segments)
        z_loss = self.cfg.z_loss if self.training else 0.0  # validation reports the plain cross-entropy
        if targets is not None and not return_logits and not last_only:
            return None, linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                              softcap=self.cfg.logit_softcap, z_loss=z_loss)
        if last_only:
            x = x[:, -1:, :]
        logits = soft_cap(self.lm_head(x), self.cfg.logit_softcap)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = cross_entropy_with_z_loss(logits.view(-1, logits.size(-1)), targets.reshape(-1), z_loss)
        return logits, loss

    def encode(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) final hidden states (after ln_f), causal attention.

        Right padding needs no mask: a causal model's real tokens never attend to what follows
        them. Task heads and pooled embeddings read these.
        """
        return self._trunk(idx, None, None)

    def _trunk(self, idx: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings, blocks and the final norm: (B, T) ids -> (B, T, C)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        mask = None
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed sequences) are for training and scoring, not with a KV cache")
            mask = segment_mask(segments)
            if positions is None:
                positions = segment_positions(segments)
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
            last_position = start + T - 1  # known without reading the device (no host sync)
        else:
            last_position = int(positions.max())
        if self.wpe is not None and last_position >= self.cfg.block_size:
            raise ValueError(f"sequence position {last_position} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        if self.training:
            x = self.drop(x)
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed")
            S = start + T
            if T == 1:
                mask = cache.key_mask[:, None, None, :S] if cache.has_padding() else None  # (B, 1, 1, S)
            else:
                cache.has_padding(recheck=True)
                causal = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(diagonal=start)  # (T, S)
                mask = causal[None, None] & cache.key_mask[:, None, None, :S]  # (B, 1, T, S)
                # A padding query whose keys are all padding would give NaN; let it see itself.
                diag = torch.arange(T, device=idx.device)[:, None] + start == torch.arange(S, device=idx.device)
                mask = mask | diag[None, None]
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def _decode_one(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """One new token per row (inference): tokens (B,), positions (B,) -> logits (B, V).

        The computation of ``forward`` for T = 1, through each block's ``decode_one`` (the same
        weights, as plain calls on (B, C) activations): no module calls and no mask unless the
        cache has padding. Decoding a small model on CPU is dominated by such per-op overhead
        once the matmuls read repacked weights (docs/generate.md, "Decoding throughput").
        tests/models/test_gpt.py checks it against ``forward``.
        """
        cfg = self.cfg
        B, S = tokens.size(0), cache.length + 1
        if S > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {S} needed")
        if positions is None:
            positions = torch.full((B,), cache.length, dtype=torch.long, device=tokens.device)
        x = F.embedding(tokens, self.wte.weight)  # (B, C)
        if self.wpe is not None:
            if cache.length >= cfg.block_size:  # positions never exceed the filled length
                raise ValueError(f"sequence position {cache.length} exceeds block_size {cfg.block_size}")
            x = x + F.embedding(positions, self.wpe.weight)
        # The embedding stands for every weight's dtype and provenance (a quantized lm_head has none).
        fast = x.device.type == "cpu" and B <= DECODE_MAX_ROWS and can_repack(x, self.wte.weight)
        kind = repack_kind(B, x.dtype) if fast else None  # chosen once per step, not per layer
        mask = cache.key_mask[:, None, None, :S] if cache.has_padding() else None  # (B, 1, 1, S)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(positions[:, None], x.dtype)  # (B, 1, 1, rotary_dim) each
        for i, block in enumerate(self.blocks):
            x = block.decode_one(x, rope, cache, i, mask, kind)
        cache.length = S
        return soft_cap(self.lm_head.repacked_matmul(_layer_norm(self.ln_f, x), kind), cfg.logit_softcap)
