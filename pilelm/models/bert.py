"""A BERT-style bidirectional encoder with a masked-LM head and an optional NSP head.

Devlin et al. 2019 ("BERT"): token + learned position + segment embeddings, post-LayerNorm
blocks (``x = LN(x + attn(x)); x = LN(x + mlp(x))``), exact GELU; the MLM head is
dense -> GELU -> LayerNorm -> decoder tied to the token embedding (+ bias); the NSP head
classifies the [CLS] vector after a tanh pooler.

Shapes: B batch, T time, C = d_model, nh heads, hs = C // nh, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.models.dropout import Dropout
from pilelm.models.spec import IGNORE_INDEX


@dataclass
class BertConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the token shards' tokenizer (rounded up to a multiple of 64)."""
    block_size: int = 128
    """Sequence length in tokens ([CLS] and [SEP] included); also the number of learned positions."""
    n_layer: int = 4
    """Number of encoder blocks."""
    n_head: int = 4
    """Attention heads per block."""
    d_model: int = 256
    """Hidden width."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and block outputs (BERT: 0.1)."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings: 2 for sentence A / B."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT: 1e-12)."""
    nsp: bool = False
    """Add the next-sentence-prediction head (and train on NSP pairs)."""
    init_std: float = 0.02
    """Std of the normal init (BERT: 0.02)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"bert.d_model ({self.d_model}) must be divisible by bert.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"bert.dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_size < 0 or self.block_size < 4 or self.n_layer < 1:
            raise ValueError("bert.vocab_size >= 0, bert.block_size >= 4 and bert.n_layer >= 1 are required")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_size(self) -> int:
        return self.d_ff or 4 * self.d_model


class EncoderBlock(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_size)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.cfg.n_head, self.cfg.head_size
        q, k, v = self.qkv(x).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        drop = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = self.ln1(x + self.drop(self.proj(y)))
        return self.ln2(x + self.drop(self.fc_out(F.gelu(self.fc(x)))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("bert.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        # MLM head: transform, then a decoder tied to the token embedding with its own bias.
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.nsp:
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.nsp_head = nn.Linear(cfg.d_model, 2)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + self.wtt.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12 L T C (PaLM appendix B; bidirectional attention
        computes the full T x T scores, twice the causal count, hence 12 not 6)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * self.cfg.n_layer * T * self.cfg.d_model

    def encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) final hidden states."""
        B, T = input_ids.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds bert.block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None]
        if token_type_ids is not None:
            x = x + self.wtt(token_type_ids)
        else:
            x = x + self.wtt.weight[0]
        x = self.drop(self.ln_emb(x))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that are real tokens
        for block in self.blocks:
            x = block(x, mask)
        return x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.wte.weight, self.mlm_bias)  # (..., V)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        num_targets: float | None = None,
        num_pairs: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (MLM logits (B, T, V), loss or None).

        labels (B, T) hold the original ids at masked positions and -100 elsewhere. The loss is
        the MLM cross-entropy averaged over the masked positions plus, with the NSP head and
        ``next_sentence_label`` (B,) (0 = B follows A), the NSP cross-entropy averaged over the
        pairs. ``num_targets`` / ``num_pairs`` replace those counts (a trainer passes the counts
        of the whole global batch so that micro-batches and ranks add up to its exact mean).
        In training mode the returned logits are empty: only masked positions are projected.
        """
        h = self.encode(input_ids, token_type_ids, attention_mask)
        if labels is None:
            return self.mlm_logits(h), None
        # Only masked positions need the vocabulary projection (15 % of the tokens).
        sel = labels != IGNORE_INDEX
        nll = F.cross_entropy(self.mlm_logits(h[sel]).float(), labels[sel], reduction="sum")
        loss = nll / (num_targets if num_targets is not None else sel.sum().clamp(min=1))
        if self.cfg.nsp and next_sentence_label is not None:
            pooled = torch.tanh(self.pooler(h[:, 0]))
            nsp = F.cross_entropy(self.nsp_head(pooled).float(), next_sentence_label, reduction="sum")
            loss = loss + nsp / (num_pairs if num_pairs is not None else next_sentence_label.numel())
        logits = torch.empty(0, device=h.device) if self.training else self.mlm_logits(h)
        return logits, loss

    def nsp_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.cfg.nsp:
            raise ValueError("this model has no NSP head (bert.nsp=false)")
        h = self.encode(input_ids, token_type_ids, attention_mask)
        return self.nsp_head(torch.tanh(self.pooler(h[:, 0])))

