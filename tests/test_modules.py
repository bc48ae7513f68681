"""The kernels the rewrite substitutes must compute what torch's and torchvision's do."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models import swin_transformer

from fxprune.modules import PrunedMultiheadAttention, shifted_window_attention


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3]])
@pytest.mark.parametrize("height", [14, 9])  # 9 needs padding to the window size
def test_window_attention_matches_torchvision(v2, shift, height):
    torch.manual_seed(0)
    x = torch.randn(2, height, height + 1, 32)
    weights = dict(qkv_weight=torch.randn(96, 32) / 6, proj_weight=torch.randn(32, 32) / 6,
                   relative_position_bias=torch.randn(4, 49, 49))
    options = dict(window_size=[7, 7], num_heads=4, shift_size=shift, qkv_bias=torch.randn(96),
                   proj_bias=torch.randn(32), logit_scale=torch.full((4, 1, 1), 2.3) if v2 else None,
                   training=False)
    expected = swin_transformer.shifted_window_attention(x, **weights, **options)
    torch.testing.assert_close(shifted_window_attention(x, **weights, **options), expected, rtol=1e-5, atol=1e-6)


def test_window_attention_with_pruned_stream_equals_masked_input_and_output():
    torch.manual_seed(1)
    x = torch.randn(1, 7, 7, 16)
    qkv, proj, bias = torch.randn(48, 16) / 4, torch.randn(16, 16) / 4, torch.randn(2, 49, 49)
    keep_in, keep_out = torch.tensor([0, 3, 4, 9, 15]), torch.tensor([1, 2, 8])
    masked_x = torch.zeros_like(x)
    masked_x[..., keep_in] = x[..., keep_in]
    expected = swin_transformer.shifted_window_attention(masked_x, qkv, proj, bias, [7, 7], 2, [0, 0],
                                                         training=False)[..., keep_out]
    actual = shifted_window_attention(x[..., keep_in], qkv[:, keep_in], proj[keep_out], bias, [7, 7], 2, [0, 0],
                                      training=False)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16)
    keep_in, keep_out = torch.tensor([1, 2, 5, 7, 11, 12]), torch.tensor([0, 4, 6])
    masked = torch.zeros_like(x)
    masked[..., keep_in] = x[..., keep_in]
    with torch.no_grad():
        expected = mha(masked, masked, masked, need_weights=False)[0][..., keep_out]
        pruned = PrunedMultiheadAttention.from_attention(mha, keep_in, keep_out)
        out, weights = pruned(x[..., keep_in], x[..., keep_in], x[..., keep_in], need_weights=False)
    assert weights is None and not pruned.training
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
