"""Sizes third-party blocks keep in plain attributes, read back from their layers once those shrank.

A module of torch's own keeps its sizes where its rule sets them (``Rule.shrink_module``). A block of a
library (a Hugging Face attention, an ultralytics CSP block) keeps some in plain ints its Python code
reads (``split(self.split_size)``, ``self.c``): each entry here names such a class, by its qualified
name (nothing is imported), and derives those ints from the block's own layers after pruning. A block
that keeps a size no entry reaches is caught by the verification (``passes/verify.py``), never guessed.
The blocks are typed ``Any``: their classes are not imported, their attributes are read by name.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn


def _gpt2_attention(block: Any) -> None:
    """GPT-2: ``c_attn`` holds q, k, v side by side and the forward splits it by ``split_size``."""
    if getattr(block, "is_cross_attention", False):
        return
    block.split_size = block.c_attn.weight.shape[1] // 3
    block.num_heads = block.split_size // block.head_dim


def _bert_attention(block: Any) -> None:
    """BERT/RoBERTa/ELECTRA self-attention: the head count and the heads' total width."""
    block.all_head_size = block.query.weight.shape[0]
    block.num_attention_heads = block.all_head_size // block.attention_head_size


def _vit_attention(block: Any) -> None:
    """ViT/DeiT self-attention: the head count."""
    block.num_attention_heads = block.q_proj.weight.shape[0] // block.head_dim


def _grouped_query_attention(block: Any) -> None:
    """Llama-style attention: ``repeat_kv`` repeats each kv head ``num_key_value_groups`` times, one per query
    head under it (equal under every kv head: the nest keeps them so)."""
    block.num_key_value_groups = block.q_proj.weight.shape[0] // block.k_proj.weight.shape[0]


def _csp_split(block: Any) -> None:
    """ultralytics C2f/C3k2/C2PSA (and kin): ``cv1`` makes two halves of ``c`` channels each (equal:
    ``Split`` keeps them so)."""
    block.c = block.cv1.conv.out_channels // 2


RESIZERS: dict[str, Callable[[nn.Module], None]] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _gpt2_attention,
    "transformers.models.bert.modeling_bert.BertSelfAttention": _bert_attention,
    "transformers.models.roberta.modeling_roberta.RobertaSelfAttention": _bert_attention,
    "transformers.models.electra.modeling_electra.ElectraSelfAttention": _bert_attention,
    "transformers.models.vit.modeling_vit.ViTSelfAttention": _vit_attention,
    "transformers.models.deit.modeling_deit.DeiTSelfAttention": _vit_attention,
    "transformers.models.llama.modeling_llama.LlamaAttention": _grouped_query_attention,
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": _grouped_query_attention,
    "transformers.models.mistral.modeling_mistral.MistralAttention": _grouped_query_attention,
    "ultralytics.nn.modules.block.C2f": _csp_split,
    "ultralytics.nn.modules.block.C2fAttn": _csp_split,
    "ultralytics.nn.modules.block.C2fPSA": _csp_split,
    "ultralytics.nn.modules.block.C2PSA": _csp_split,
    "ultralytics.nn.modules.block.PSA": _csp_split,
    "ultralytics.nn.modules.block.RepNCSPELAN4": _csp_split,
}


def resizer(module: nn.Module) -> Callable[[nn.Module], None] | None:
    """The entry of ``module``'s class or its nearest base class that has one."""
    for cls in type(module).__mro__:
        found = RESIZERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def resize_attributes(model: nn.Module, changed: set[str]) -> None:
    """Set the plain size attributes of every block of ``model`` that holds a module in ``changed``."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if (resize := resizer(module)) is not None and any(c.startswith(prefix) for c in changed):
            resize(module)
