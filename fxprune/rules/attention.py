"""Attention: scaled dot-product attention (heads pruned whole), ``nn.MultiheadAttention`` used as
self-attention, and Swin's ``shifted_window_attention`` (both keep their heads; what is prunable is the
residual stream they read and write).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import graph
from fxprune.modules import PrunedMultiheadAttention, shifted_window_attention
from fxprune.rules.base import Kept, Probe, Rule, TensorAxis, arg, input_space, kept_of, tensor_inputs
from fxprune.rules.coupling import ChannelBuilder
from fxprune.rules.shape import ensure_space


class ScaledDotProductAttention(Rule):
    """``F.scaled_dot_product_attention(q, k, v)`` on (..., H, L, E): heads go whole. Head h of q, k, v and of
    the output are one group channel, and so is the block of projection channels each head is made from
    (q/k/v projections split by ``view``, a fused qkv by ``reshape``/``permute``/``unbind``, the output
    projection after the heads are merged back). Within a head nothing is pruned: the scale reads E.
    Grouped-query attention with ``enable_gqa`` prunes kv heads and the query heads under each (a nest: the
    same number under every kept kv head, so the layer stays a valid GQA layer); with Hugging Face's
    ``repeat_kv`` before it, a kv head and its query heads go as one. A mask with one row per head keeps
    every head."""

    name = "scaled_dot_product_attention"
    functions = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        q, k, v = (cast(torch.fx.Node, x) for x in node.args[:3])  # tensors (a shape each)
        mask = arg(node, 3, "attn_mask")
        shapes = [b.tensor_shape(x) for x in (q, k, v)]
        rank = len(shapes[0])
        heads = shapes[0][-3] if rank >= 3 else 0
        kv_heads = shapes[1][-3] if rank >= 3 else 0
        grouped = bool(arg(node, 7, "enable_gqa", False)) and rank >= 3 and shapes[2][-3] == kv_heads \
            and kv_heads and heads % kv_heads == 0
        why = ("its inputs have no head dim" if rank < 3 or any(len(s) != rank for s in shapes)
               else "its heads differ in number without enable_gqa" if any(s[-3] != heads for s in shapes)
               and not grouped
               else "its mask has one row per head" if isinstance(mask, torch.fx.Node)
               and len(b.tensor_shape(mask)) >= 3 and b.tensor_shape(mask)[-3] != 1 else None)
        if why is None:
            q_space, k_space, v_space = (b.head_space(x, rank - 3) for x in (q, k, v))
            if q_space is not None and k_space is not None and v_space is not None:
                out = b.new_space(node, rank - 3)
                b.couple(out, q_space)
                b.couple(k_space, v_space)
                parent = np.arange(heads) // (heads // kv_heads)  # query head h reads kv head h // group
                if heads == kv_heads:
                    b.couple(q_space, k_space)
                else:  # grouped-query attention: kv heads, and the query heads under each, evenly
                    b.nest(q_space, k_space, parent)
                return
            why = "its q, k and v are not all split into heads from tracked channels"
        for x in (q, k, v):
            # a pending layout gets its spaces, then is frozen
            b.head_space(x, -3 if len(b.tensor_shape(x)) >= 3 else -1)
            b.freeze(b.space_of(x), f"{node.name}: {why}")


class MultiheadAttention(Rule):
    """Self-attention without masks or returned weights: embedding in and out prunable, heads frozen.

    ``nn.MultiheadAttention`` ties its input and output width to its head width, so the rewrite replaces
    it by ``fxprune.modules.PrunedMultiheadAttention``, whose input and output widths are its own.
    """

    name = "multihead_attention"
    owns_tensors = True
    modules = (nn.MultiheadAttention,)

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        query, key, value = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        masks = [arg(node, i, n) for i, n in ((3, "key_padding_mask"), (5, "attn_mask"))]
        need_weights = arg(node, 4, "need_weights", True)
        if not (query is key is value) or any(m is not None for m in masks) or need_weights:
            for src in tensor_inputs(node):
                b.freeze(b.space_of(src), f"{node.name}: only self-attention without masks or returned "
                         "weights is supported")
            return
        in_space = ensure_space(b, query, -1)
        b.new_space(node, len(b.tensor_shape(query)) - 1, size=in_space.size, index=0)
        self.claim_tensors(b, node)

    def tensor_axes(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[TensorAxis]:
        out, inp, target = graph.space(node), input_space(node), graph.target_name(node)
        if out is None:
            return []
        module = gm.get_submodule(target)
        assert isinstance(module, nn.MultiheadAttention)  # a module of this rule's classes
        axes = [TensorAxis(f"{target}.out_proj.weight", 0, out, True)]
        if module.out_proj.bias is not None:
            axes.append(TensorAxis(f"{target}.out_proj.bias", 0, out, True))
        if inp is not None:
            axes.append(TensorAxis(f"{target}.in_proj_weight", 1, inp, False))
        return axes

    def shrink_module(self, module: nn.Module, node: torch.fx.Node, kept: Kept) -> nn.Module | None:
        """A ``PrunedMultiheadAttention`` where the stream's widths changed (``nn.MultiheadAttention`` ties
        them to its heads); its tensors are the originals (``owns_tensors``), indexed here."""
        keep_in, keep_out = kept_of(input_space(node), kept), kept_of(graph.space(node), kept)
        if keep_in is None and keep_out is None:
            return None
        assert isinstance(module, nn.MultiheadAttention)  # a module of this rule's classes (owns)
        embed = torch.arange(module.embed_dim)
        return PrunedMultiheadAttention.from_attention(module, embed if keep_in is None else keep_in,
                                                       embed if keep_out is None else keep_out)

    def importance_rows(self, gm, node):
        return f"{node.target}.out_proj.weight", lambda w: w

    def flop_probe(self, gm: torch.nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict) -> Probe | None:
        """FLOPs as fxprune's kernel computes them at kept widths (torch's fused eval-mode kernel is
        invisible to FlopCounterMode)."""
        mha = gm.get_submodule(graph.target_name(node))
        assert isinstance(mha, nn.MultiheadAttention)  # a module of this rule's classes
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or graph.space(node) is None:
            return None
        x = args[0]

        def probe(kin: int, kout: int) -> Callable[[], Any]:
            module = PrunedMultiheadAttention.from_attention(mha, torch.arange(kin), torch.arange(kout))
            return lambda: module(x[..., :kin])
        return probe


class WindowAttention(Rule):
    """Swin's shifted_window_attention: the stream width in (qkv columns) and out (proj rows) prunable.

    torchvision's kernel derives the head width from the input width, so the rewrite swaps in
    ``fxprune.modules.shifted_window_attention``, which reads every width from the weights.
    """

    name = "window_attention"

    def couple(self, b: ChannelBuilder, node: torch.fx.Node) -> None:
        x, qkv_weight, proj_weight = (cast(torch.fx.Node, a) for a in node.args[:3])  # checked below: params
        proj_bias = arg(node, 10, "proj_bias")
        params = [qkv_weight, proj_weight] + ([proj_bias] if proj_bias is not None else [])
        if not all(isinstance(p, torch.fx.Node) and p.op == "get_attr" for p in params):
            Rule.couple(self, b, node)
            return
        b.couple(ensure_space(b, x, -1), ensure_space(b, qkv_weight, 1))
        out = b.new_space(node, len(b.tensor_shape(node)) - 1)
        for param in params[1:]:
            b.couple(out, ensure_space(b, param, 0))
        b.info(node).notes["prunable"] = True

    def update(self, gm: torch.fx.GraphModule, node: torch.fx.Node, kept: Kept) -> None:
        if kept_of(input_space(node), kept) is not None or kept_of(graph.space(node), kept) is not None:
            node.target = shifted_window_attention

    def flop_probe(self, gm: torch.nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict) -> Probe | None:
        if not graph.channels(node).notes.get("prunable"):
            return None
        x, qkv_weight, proj_weight, *rest = args

        def probe(kin: int, kout: int) -> Callable[[], Any]:
            return lambda: shifted_window_attention(x[..., :kin], qkv_weight[:, :kin], proj_weight[:kout], *rest,
                                                    **{**kwargs, "proj_bias": None})
        return probe
