"""The plan applied to the user's own modules: a copy of the model's class, shape-generic, the model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune import zoo
from fxprune.passes.pipeline import prune as prune_graph
from fxprune.passes.shrink import shrink_model
from fxprune.passes.verify import masked_model, verify_model
from fxprune.testing import build_torchvision_model, randomize_parameters


def _sizes_match_tensors(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == m.weight.shape[0] and m.in_channels == m.weight.shape[1] * m.groups, name
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.running_mean.shape[0], name


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "resnext50_32x4d"])
def test_a_torchvision_model_comes_back_as_its_own_class_at_any_size(name):
    model, (x,) = build_torchvision_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.analyze(model, (x,))
    plan = fxprune.random_plan(gm, 0.5, seed=1)
    shrunk = shrink_model(model, gm, plan)
    assert type(shrunk) is type(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not modified
    _sizes_match_tensors(shrunk)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(shrunk.eval()(x), prune_graph(gm, plan)(x), rtol=1e-4, atol=1e-5)
        other = torch.randn(2, 3, 96, 80)  # another batch size and image size: the graph was traced at 1x3x64x64
        torch.testing.assert_close(shrunk(other), masked_model(model, gm, plan).eval()(other), rtol=1e-4, atol=1e-5)


def test_tied_weights_stay_one_tensor():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            x = self.embed(ids)
            return self.head(x + self.down(torch.relu(self.up(x))))

    model, ids = Tied().eval(), torch.randint(0, 20, (1, 7))
    gm = fxprune.analyze(model, (ids,))
    plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
    assert plan.keep, "the hidden and MLP widths are prunable"
    shrunk = shrink_model(model, gm, plan)
    assert shrunk.head.weight is shrunk.embed.weight
    assert shrunk.embed.embedding_dim == shrunk.embed.weight.shape[1] < 16 or shrunk.up.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids), prune_graph(gm, plan)(ids))


class _Halves(nn.Module):
    """A CSP block as ultralytics writes it: one conv, chunk(2), one half through more convs, cat."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.inner, self.cv2 = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(24, 4, 1)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.inner(b)], 1))


@settings(max_examples=15, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=16, max_size=16), seed=st.integers(0, 100))
def test_halves_split_by_count_stay_equal_under_any_plan(keep, seed):
    """chunk(2) in the user's code splits by count: every plan keeps the two halves equal, so the shrunk
    module (its code unchanged) computes what the pruned graph does."""
    model, x = randomize_parameters(_Halves().eval(), seed), torch.randn(1, 3, 8, 8)
    gm = fxprune.analyze(model, (x,))
    group = next(g for g in fxprune.groups(gm) if g.prunable and g.members[0].node == "cv1")
    assert group.size == 16  # the halves' 8 position pairs and inner's 8 channels (one group through the cat)
    mask = np.array(keep[:group.size])
    for space in fxprune.analysis(gm).spaces:  # every layer keeps one channel at least
        if space.group_id == group.id and not mask[space.channel_index].any():
            mask[space.channel_index[seed % space.size]] = True
    plan = fxprune.Plan({group.id: np.flatnonzero(mask)})
    shrunk = shrink_model(model, gm, plan)
    assert shrunk.cv1.out_channels == 2 * shrunk.inner.in_channels  # the halves stay equal
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prune_graph(gm, plan)(x))
        torch.testing.assert_close(shrunk(torch.randn(3, 3, 5, 7)).shape, torch.Size([3, 4, 5, 7]))


def test_hugging_face_sizes_kept_in_attributes_are_set_again():
    """GPT-2 splits its fused qkv by ``split_size`` and reshapes by Conv1D's ``nf``: both follow the heads."""
    model, inputs = zoo.build("hf_text", "gpt2")
    gm = fxprune.analyze(randomize_parameters(model), inputs)
    heads = [g for g in fxprune.groups(gm) if g.prunable and g.size == 4]
    plan = fxprune.Plan({g.id: np.array([0, 2]) for g in heads})
    shrunk = shrink_model(model, gm, plan)
    attention = shrunk.transformer.h[0].attn
    assert (attention.split_size, attention.num_heads, attention.c_attn.nf) == (32, 2, 96)
    longer = {"input_ids": torch.randint(0, 512, (2, 24))}
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**longer).logits, masked_model(model, gm, plan)(**longer).logits,
                                   rtol=1e-4, atol=1e-5)


def test_verification_names_a_module_whose_code_keeps_a_size():
    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.width = 16

        def forward(self, x):
            y = self.conv(x)
            # keeps 16, whatever the conv makes
            return y.view(y.shape[0], self.width, y.shape[2], y.shape[3]).mean((2, 3))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = HardCoded(), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.block(x))

    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    gm = fxprune.analyze(model, (x,), capture="export")
    plan = fxprune.random_plan(gm, 0.5, seed=0)
    assert plan.keep
    pruned = fxprune.prune(gm, plan)
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, pruned, gm, plan, (x,), {})
    assert not verification.ok and "block (HardCoded)" in verification.failure

    returned = fxprune.compile(model, fxprune.FLOPs(0.6), (x,), capture="export", progress=False)
    report = fxprune.report(returned)
    assert isinstance(returned, torch.fx.GraphModule) and report.returned == "GraphModule"
    assert any("block (HardCoded)" in note for note in report.notes)
