"""The dependency pass on small models, one coupling rule at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.ir import graph
from fxprune.testing import masked_forward


def _group_of(gm, node_name: str):
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    space = graph.space(node)
    return fxprune.analysis(gm).groups[space.group_id], space


def _check_equivalent(model, inputs, seed=0, keep_ratio=0.5):
    gm = fxprune.analyze(model, inputs)
    plan = fxprune.random_plan(gm, keep_ratio, seed=seed, include_norm_coupled=False)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        expected, actual = masked_forward(gm, plan, *inputs), pruned(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    return gm, pruned


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + F.relu(self.bn(self.a(x))))


def test_residual_add_couples_both_branches():
    gm = fxprune.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))
    group, _ = _group_of(gm, "stem")
    assert group.prunable and group.size == 16
    assert {"stem", "a", "bn", "add"} <= {m.node for m in group.members}
    _check_equivalent(Residual().eval(), (torch.randn(1, 3, 8, 8),))


def test_model_input_and_output_are_frozen():
    gm = fxprune.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))
    assert "model input" in _group_of(gm, "x")[0].frozen_reason
    assert "model output" in _group_of(gm, "head")[0].frozen_reason


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(14, 14, 1)
        self.d = nn.Conv2d(7, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1) + self.c(torch.cat([self.a(x), self.b(x)], 1))
        left, right = y.chunk(2, dim=1)
        return self.d(left) * self.d(right)


def test_concat_members_sit_at_their_offsets():
    gm = fxprune.analyze(ConcatSplit().eval(), (torch.randn(1, 3, 4, 4),))
    group, cat_space = _group_of(gm, "cat")
    _, a_space = _group_of(gm, "a")
    _, b_space = _group_of(gm, "b")
    # self.d runs on both chunk halves, so channel i of each half is one unit: 14 channels, 7 units
    assert group.size == 7
    np.testing.assert_array_equal(cat_space.channel_index[:7], cat_space.channel_index[7:])
    np.testing.assert_array_equal(cat_space.channel_index[:8], a_space.channel_index)
    np.testing.assert_array_equal(cat_space.channel_index[8:], b_space.channel_index)


def test_split_after_concat_prunes_equivalently():
    for seed in range(4):
        _check_equivalent(ConcatSplit().eval(), (torch.randn(1, 3, 4, 4),), seed=seed)


def test_shared_module_called_twice_keeps_one_shape():
    _, pruned = _check_equivalent(ConcatSplit().eval(), (torch.randn(1, 3, 4, 4),))
    assert pruned.d.in_channels < 7


class Depthwise(nn.Module):
    def __init__(self, multiplier=2, groups=None):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=groups or 8)
        self.gn = nn.GroupNorm(4, 8 * multiplier)
        self.out = nn.Conv2d(8 * multiplier, 3, 1)

    def forward(self, x):
        return self.out(self.gn(self.dw(self.pw(x))))


def test_depthwise_multiplier_makes_each_input_channel_one_unit():
    gm = fxprune.analyze(Depthwise(multiplier=2).eval(), (torch.randn(1, 3, 6, 6),))
    group, pw = _group_of(gm, "pw")
    _, dw = _group_of(gm, "dw")
    assert group is _group_of(gm, "dw")[0]
    # dw output channels 2k and 2k+1 belong with input channel k; GroupNorm(4, 16) blocks of 4 merge pairs
    assert group.size == 4
    np.testing.assert_array_equal(dw.channel_index[::4], pw.channel_index[::2])
    _, pruned = _check_equivalent(Depthwise(multiplier=2).eval(), (torch.randn(1, 3, 6, 6),))
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels // 2


def test_grouped_conv_prunes_whole_groups():
    gm, pruned = _check_equivalent(Depthwise(multiplier=1, groups=2).eval(), (torch.randn(1, 3, 6, 6),))
    assert _group_of(gm, "dw")[0].size == 2
    assert pruned.dw.groups == 1 and pruned.dw.out_channels == 4


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 10)
        self.se_fc = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.se_fc(x.mean((2, 3), keepdim=True)))  # squeeze-and-excitation
        return self.fc(torch.flatten(self.pool(x), 1))


def test_flatten_maps_one_channel_to_a_block_of_features():
    gm = fxprune.analyze(FlattenLinear().eval(), (torch.randn(1, 3, 8, 8),))
    group, flat = _group_of(gm, "flatten")
    assert group.size == 6 and flat.size == 24
    np.testing.assert_array_equal(flat.channel_index, np.repeat(_group_of(gm, "conv")[1].channel_index, 4))
    _, pruned = _check_equivalent(FlattenLinear().eval(), (torch.randn(1, 3, 8, 8),))
    assert pruned.fc.in_features == 12


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.out(x)


def test_channel_shuffle_becomes_a_gather():
    gm, pruned = _check_equivalent(Shuffle().eval(), (torch.randn(1, 3, 4, 4),))
    assert _group_of(gm, "conv")[0].prunable
    assert any(n.target is torch.index_select for n in pruned.graph.nodes)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.cumsum(self.conv(x), dim=1))


def test_unknown_op_freezes_its_inputs_with_a_reason():
    gm = fxprune.analyze(Unknown().eval(), (torch.randn(1, 3, 4, 4),))
    group, _ = _group_of(gm, "conv")
    assert not group.prunable and "cumsum" in group.frozen_reason


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm and Linear there, permute back."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)
        self.stem = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(x + self.scale * y)


def test_channels_last_block_groups_stream_and_hidden_width():
    gm = fxprune.analyze(ChannelsLast().eval(), (torch.randn(1, 3, 5, 5),))
    stream, _ = _group_of(gm, "stem")
    hidden, _ = _group_of(gm, "up")
    assert stream.norm_coupled and stream.prunable and "scale" in {m.node for m in stream.members}
    assert hidden.prunable and not hidden.norm_coupled and hidden.size == 32
    _check_equivalent(ChannelsLast().eval(), (torch.randn(1, 3, 5, 5),))


def test_norm_coupled_group_prunes_to_a_consistent_model():
    model = ChannelsLast().eval()
    gm = fxprune.analyze(model, (torch.randn(1, 3, 5, 5),))
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5, seed=0))
    assert pruned.norm.normalized_shape == (4,) and pruned.scale.shape == (4, 1, 1)
    assert pruned(torch.randn(2, 3, 5, 5)).shape == (2, 3, 5, 5)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x)


def test_attention_embedding_is_prunable_and_heads_stay():
    gm, pruned = _check_equivalent(Attention().eval(), (torch.randn(2, 5, 6),))
    assert _group_of(gm, "embed")[0].prunable
    assert pruned.attn.inner_dim == 16 and pruned.attn.in_proj.in_features == 8


class WidthRead(nn.Module):
    """Reads a prunable tensor's channel count at run time (MaxViT's attention does this)."""

    def __init__(self, use="reshape"):
        super().__init__()
        self.use = use
        self.conv = nn.Conv2d(3, 8, 1)
        self.other = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        c = y.shape[1]
        if self.use == "reshape":  # sets the width of a tensor fxprune does not track
            z = torch.cumsum(self.other(x), 1).reshape(x.shape[0], c, -1)
        else:  # arithmetic on the width: its value would change after pruning
            z = self.other(x) / c
        return self.head(y), z


def test_width_read_setting_an_untracked_axis_keeps_its_traced_value():
    model = WidthRead("reshape").eval()
    inputs = (torch.randn(1, 3, 4, 4),)
    gm = fxprune.analyze(model, inputs)
    assert _group_of(gm, "conv")[0].prunable
    plan = fxprune.random_plan(gm, 0.5)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        (_, expected_z), (_, actual_z) = masked_forward(gm, plan, *inputs), pruned(*inputs)
    assert actual_z.shape == (1, 8, 16)
    torch.testing.assert_close(actual_z, expected_z)


def test_width_read_used_in_arithmetic_freezes_the_group():
    gm = fxprune.analyze(WidthRead("divide").eval(), (torch.randn(1, 3, 4, 4),))
    group, _ = _group_of(gm, "conv")
    assert not group.prunable and "read at run time" in group.frozen_reason


class ReshapedByAnotherWidth(nn.Module):
    """timm's pvt_v2 attention: a spatial-reduction conv's output reshaped with the width of its input,
    read at run time (``B, C, H, W = x.shape; sr(x).reshape(B, C, -1)``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.sr = nn.Conv2d(16, 16, 2, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        batch, channels, _, _ = x.shape
        reduced = self.sr(x).reshape(batch, channels, -1).permute(0, 2, 1)
        return self.head(reduced.mean(1))


def test_a_width_read_sizing_another_group_freezes_that_group_and_writes_the_number_back():
    """The axis it sizes keeps its width (the traced number goes back into the reshape); the group whose
    width was read stays prunable, since nothing reads it any more."""
    inputs = (torch.randn(1, 3, 8, 8),)
    gm, _ = _check_equivalent(ReshapedByAnotherWidth().eval(), inputs)
    assert _group_of(gm, "stem")[0].prunable
    assert not _group_of(gm, "sr")[0].prunable and "another group" in _group_of(gm, "sr")[0].frozen_reason
    pruned = fxprune.prune(gm, fxprune.random_plan(gm, 0.5, seed=1))
    assert pruned(*inputs).shape == (1, 4)


def test_conv1d_conv3d_and_transposed_convs():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 6, 3)
            self.c1b = nn.Conv1d(6, 2, 1)
            self.t = nn.ConvTranspose2d(2, 6, 2, stride=2)
            self.t2 = nn.ConvTranspose2d(6, 2, 1)
            self.c3 = nn.Conv3d(2, 4, 1)
            self.c3b = nn.Conv3d(4, 1, 1)

        def forward(self, a, b, c):
            return self.c1b(self.c1(a)).sum() + self.t2(self.t(b)).sum() + self.c3b(self.c3(c)).sum()

    inputs = (torch.randn(1, 2, 7), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 2, 2, 2))
    gm, pruned = _check_equivalent(Mixed().eval(), inputs)
    assert pruned.c1.out_channels == 3 and pruned.t.out_channels == 3 and pruned.c3.out_channels == 2


class InputConcat(nn.Module):
    """The model's input concatenated with features (a U-Net's skip, RAFT's flow beside its motion features):
    the input's 3 channels can't go, the features' may."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(11, 6, 1)

    def forward(self, x):
        return self.mix(torch.cat([x, F.relu(self.features(x))], dim=1))


def test_a_frozen_part_of_a_concat_keeps_its_channels_and_frees_the_rest():
    x = torch.randn(1, 3, 8, 8)
    gm = fxprune.analyze(InputConcat().eval(), (x,))
    group, _ = _group_of(gm, "cat")
    assert group.prunable and group.size == 11 and group.fixed.tolist() == [0, 1, 2]
    assert "model input" in group.fixed_reason
    for seed in range(4):  # random plans keep the fixed channels and prune the rest exactly
        _check_equivalent(InputConcat().eval(), (x,), seed=seed)
    with pytest.raises(fxprune.PlanError, match="must stay"):
        fxprune.prune(gm, fxprune.Plan({group.id: np.arange(5, 11)}))
    pruned = fxprune.compile(InputConcat().eval(), fxprune.FLOPs(0.7), (x,), progress=False)
    assert pruned.mix.in_channels < 11 and pruned.features.in_channels == 3
    report = fxprune.report(pruned)
    assert report.flops_after <= 0.7 * report.flops_before
