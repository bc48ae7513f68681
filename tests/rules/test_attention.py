"""Attention as decoder LLMs write it: grouped-query heads (repeat_kv, or SDPA's enable_gqa), rotary
embeddings on q and k, RMS norms on the residual stream; pruned exactly, in the graph and in the module."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.shrink import shrink_model
from fxprune.passes.verify import masked_model
from fxprune.testing import masked_forward, randomize_parameters


class RMSNorm(nn.Module):
    def __init__(self, width: int, one_plus: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-6
        self.one_plus = one_plus  # Gemma's scale: (1 + weight)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x * (1 + self.weight) if self.one_plus else self.weight * x


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder(nn.Module):
    """Two pre-norm decoder layers: grouped-query attention with rotary embeddings, and a gated MLP."""

    def __init__(self, width=32, heads=4, kv_heads=2, head_dim=8, hidden=48, enable_gqa=False, one_plus=False):
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.head_dim, self.groups, self.enable_gqa = head_dim, heads // kv_heads, enable_gqa
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.attn_norm, layer.mlp_norm = RMSNorm(width, one_plus), RMSNorm(width, one_plus)
            layer.q = nn.Linear(width, heads * head_dim, bias=False)
            layer.k = nn.Linear(width, kv_heads * head_dim, bias=False)
            layer.v = nn.Linear(width, kv_heads * head_dim, bias=False)
            layer.o = nn.Linear(heads * head_dim, width, bias=False)
            layer.gate, layer.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
            layer.down = nn.Linear(hidden, width, bias=False)
            self.layers.append(layer)
        self.norm = RMSNorm(width, one_plus)
        self.head = nn.Linear(width, 64, bias=False)

    def _heads(self, x, projection):
        b, s, _ = x.shape
        return projection(x).view(b, s, -1, self.head_dim).transpose(1, 2)

    def forward(self, ids):
        x = self.embed(ids)
        angles = torch.arange(ids.shape[1]).float()[:, None] * self.inv_freq[None]
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        for layer in self.layers:
            h = layer.attn_norm(x)
            q, k, v = self._heads(h, layer.q), self._heads(h, layer.k), self._heads(h, layer.v)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if not self.enable_gqa:  # repeat_kv, as Hugging Face writes it
                b, kv, s, d = k.shape
                k = k[:, :, None].expand(b, kv, self.groups, s, d).reshape(b, kv * self.groups, s, d)
                v = v[:, :, None].expand(b, kv, self.groups, s, d).reshape(b, kv * self.groups, s, d)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.enable_gqa)
            x = x + layer.o(out.transpose(1, 2).reshape(*x.shape[:2], -1))
            h = layer.mlp_norm(x)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        return self.head(self.norm(x))


def _analysed(model):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model = randomize_parameters(model.eval())
    return model, ids, fxprune.analyze(model, (ids,), capture="export")


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_grouped_query_heads_prune_under_their_kv_heads_and_the_rms_normed_stream_prunes_exactly(enable_gqa):
    model, ids, gm = _analysed(Decoder(enable_gqa=enable_gqa))
    free = {g.size for g in fxprune.groups(gm) if g.frozen_reason is None}
    # kv heads per layer (with repeat_kv, each with its 2 query heads; with enable_gqa, the 4 query heads nested
    # under them), MLP per layer, the stream
    assert free == ({2, 4, 48, 32} if enable_gqa else {2, 48, 32})
    assert len(fxprune.analysis(gm).nests) == (2 if enable_gqa else 0)
    for seed in range(3):
        plan = fxprune.random_plan(gm, 0.5, seed=seed)
        pruned = fxprune.prune(gm, plan)
        with torch.no_grad():
            expected = masked_forward(gm, plan, ids)[0]  # the graph's flat outputs
            torch.testing.assert_close(pruned(ids), expected, rtol=1e-4, atol=1e-5)
            # the user's class, smaller, at another length: heads by the view's -1, the norm rescaled
            shrunk, reference = shrink_model(model, gm, plan), masked_model(model, gm, plan)
            longer = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(shrunk(longer), reference(longer), rtol=1e-4, atol=1e-5)
    assert shrunk.layers[0].k.out_features < 16 or shrunk.layers[1].k.out_features < 16 \
        or shrunk.norm.weight.numel() < 32


def test_an_rms_norm_whose_scale_is_not_its_weight_keeps_the_stream_with_the_reason():
    _, _, gm = _analysed(Decoder(one_plus=True))
    stream = next(g for g in fxprune.groups(gm) if g.size == 32)
    assert "not its weight times x / rms(x)" in stream.frozen_reason
    assert {g.size for g in fxprune.groups(gm) if g.frozen_reason is None} == {2, 48}
