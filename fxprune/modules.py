"""Modules the rewrite pass substitutes where torch's own cannot express a pruned layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.Module):
    """Self-attention whose input and output widths differ from its internal (per-head) width.

    ``nn.MultiheadAttention`` ties the embedding width to the q/k/v width, so pruning the residual
    stream of a ViT would force pruning inside every head. This module keeps the heads intact and
    takes ``in_features`` inputs and returns ``out_features`` outputs. Call signature and return value
    match ``nn.MultiheadAttention(x, x, x, need_weights=False)``: ``(output, None)``.
    """

    def __init__(self, in_features: int, out_features: int, inner_dim: int, num_heads: int,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.inner_dim = inner_dim
        self.batch_first = batch_first
        self.dropout = dropout
        self.in_proj = nn.Linear(in_features, 3 * inner_dim, bias=bias)
        self.out_proj = nn.Linear(inner_dim, out_features, bias=bias)

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, keep_in: torch.Tensor,
                       keep_out: torch.Tensor) -> "PrunedMultiheadAttention":
        """Copy ``mha``'s weights, keeping input columns ``keep_in`` and output rows ``keep_out``."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("only plain self-attention with packed q/k/v weights is supported")
        has_bias = mha.in_proj_bias is not None
        new = cls(len(keep_in), len(keep_out), mha.embed_dim, mha.num_heads, has_bias, mha.batch_first,
                  mha.dropout).to(mha.in_proj_weight)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight[:, keep_in])
            new.out_proj.weight.copy_(mha.out_proj.weight[keep_out])
            if has_bias:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias[keep_out])
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, **unused) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, _ = x.shape
        qkv = self.in_proj(x).reshape(batch, length, 3, self.num_heads, self.inner_dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = self.out_proj(attended.transpose(1, 2).reshape(batch, length, self.inner_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None
