"""Modules the rewrite pass substitutes where torch's own cannot express a pruned layer."""

from __future__ import annotations

import math

import torch
import torch.fx
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


def _to_windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * windows, wh * ww, C], windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // wh, wh, width // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, channels)


def _from_windows(x: torch.Tensor, batch: int, height: int, width: int, wh: int, ww: int) -> torch.Tensor:
    """Inverse of ``_to_windows``."""
    x = x.view(batch, height // wh, width // ww, wh, ww, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, -1)


def _shift_mask(height: int, width: int, wh: int, ww: int, sh: int, sw: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask [windows, wh*ww, wh*ww]: -100 between positions that came from different regions."""
    def regions(size: int, window: int, shift: int) -> torch.Tensor:
        index = torch.arange(size, device=like.device)
        return (index >= size - window).long() + (index >= size - shift).long()

    region = regions(height, wh, sh)[:, None] * 3 + regions(width, ww, sw)[None, :]
    region = _to_windows(region[None, :, :, None].to(like.dtype), wh, ww).squeeze(-1)
    differ = region[:, None, :] != region[:, :, None]
    return torch.zeros(differ.shape, dtype=like.dtype, device=like.device).masked_fill(differ, -100.0)


def shifted_window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                             relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                             shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                             qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                             logit_scale: torch.Tensor | None = None, training: bool = True) -> torch.Tensor:
    """Swin (v1 and v2) window attention whose widths come from the weights, not from ``x``.

    Same arguments and result as torchvision's ``shifted_window_attention``, but the input width is
    ``qkv_weight.shape[1]``, the per-head width ``qkv_weight.shape[0] // (3 * num_heads)`` and the
    output width ``proj_weight.shape[0]``, so the residual stream can be pruned while heads stay whole.
    """
    batch, height, width, _ = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
    padded_h, padded_w = x.shape[1], x.shape[2]
    sh = 0 if wh >= padded_h else shift_size[0]
    sw = 0 if ww >= padded_w else shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    windows = _to_windows(x, wh, ww)
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    if logit_scale is not None and qkv_bias is not None:  # Swin v2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
    qkv = F.linear(windows, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(windows.shape[0], windows.shape[1], 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sh or sw:
        mask = _shift_mask(padded_h, padded_w, wh, ww, sh, sw, attn)
        attn = (attn.view(batch, -1, num_heads, wh * ww, wh * ww) + mask[None, :, None]).flatten(0, 1)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(windows.shape[0], windows.shape[1], inner)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    x = _from_windows(out, batch, padded_h, padded_w, wh, ww)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


torch.fx.wrap("shifted_window_attention")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The call's first tensor argument, positional or keyword (Hugging Face calls its blocks with keywords)."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


class Skip(nn.Module):
    """A residual block the plan removed: returns the block's input, ``x + f(x)`` without ``f``."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _first_tensor(args, kwargs)


class ZeroBranch(nn.Module):
    """The branch ``f`` of a residual block the plan removed, where the model's code adds it: a zero
    that broadcasts, so ``x + f(x)`` is ``x``. ``returns``: where the module returned a tuple (Hugging Face's
    attention: its output and its weights), its length; the zero comes first, None after it."""

    def __init__(self, returns: int = 0) -> None:
        super().__init__()
        self.returns = returns

    def forward(self, *args, **kwargs) -> torch.Tensor | tuple:
        zero = _first_tensor(args, kwargs).new_zeros(())
        return (zero, *[None] * (self.returns - 1)) if self.returns else zero

    def extra_repr(self) -> str:
        return f"returns={self.returns}" if self.returns else ""
