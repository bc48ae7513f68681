"""Removable residual blocks: found in the graph, removed from the graph and from the user's model, priced
and chosen by the knapsack with the channels (depth and width in one plan)."""

import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from examples.models import CifarResNet
from fxprune.ir.channels import Plan
from fxprune.modules import Skip, ZeroBranch
from fxprune.passes.cost import CostPass, count_flops, count_params
from fxprune.passes.keep import KeepPass
from fxprune.passes.rewrite import kept_shares
from fxprune.passes.shrink import shrink_model
from fxprune.passes.verify import verify_model
from fxprune.testing import masked_forward


class Signed(nn.Module):
    """``tanh(x + f(x))`` on a signed input: without the branch it is tanh(x), not x; ``inline``: the
    branch is this module's own code, so no module holds it alone."""

    def __init__(self, inline: bool = False) -> None:
        super().__init__()
        self.inline = inline
        self.f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.w1, self.w2 = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        inline = F.linear(torch.relu(F.linear(x, self.w1)), self.w2) if self.inline else None
        return torch.tanh(x + (inline if self.inline else self.f(x)))


class InlineResidual(nn.Module):
    """A residual add in the model's own forward whose branch is two modules: no module holds it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.b(torch.relu(self.a(x))))


def _eval(model):
    model.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_resnet18s_blocks_are_its_blocks_without_downsample_found_in_the_graph(capture):
    model = torchvision.models.resnet18().eval()
    gm = fxprune.analyze(model, (torch.randn(1, 3, 64, 64),), capture=capture)
    found, why = fxprune.blocks(gm)
    assert [b.module for b in found] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert all(b.kind == "skip" and len(b.groups) == 1 for b in found)
    assert sum("does not read the skip input" in reason for reason in why.values()) == 3  # downsample


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_inverted_residuals_and_layer_scaled_blocks_are_found(name):
    model = getattr(torchvision.models, name)().eval()
    gm = fxprune.analyze(model, (torch.randn(1, 3, 64, 64),))
    found, _ = fxprune.blocks(gm)
    assert len(found) >= 3
    zeroed = [name for b in found for name in b.zeroed]
    if name == "convnext_tiny":  # layer scale is the branch's last parameter
        assert all(z.endswith("layer_scale") for z in zeroed)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_removed_blocks_match_the_masked_reference_in_the_graph_and_the_users_model(capture, residual_net):
    model = _eval(residual_net())
    x = torch.randn(2, 3, 16, 16)
    gm = fxprune.analyze(model, (x,), capture=capture)
    found, _ = fxprune.blocks(gm)
    assert len(found) == 3
    plan = fxprune.random_plan(gm, 0.5, seed=1)
    plan.drop = (0, 2)
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        expected, got = masked_forward(gm, plan, x), pruned(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("blocks.0" in name or "blocks.2" in name for name, _ in pruned.named_parameters())
    shrunk = shrink_model(model, gm, plan)
    assert type(shrunk) is residual_net and isinstance(shrunk.blocks[0], Skip) and isinstance(shrunk.blocks[2], Skip)
    assert not isinstance(shrunk.blocks[1], Skip)
    verification = verify_model(model, shrunk, pruned, gm, plan, (x,), {})
    assert verification.ok, verification.failure
    assert len(verification.shapes) == 3
    # the cost models price the removed blocks at nothing: exact FLOPs and parameters of the pruned graph
    CostPass((x,))(gm)
    shares = kept_shares(gm, plan)
    assert gm.meta["fxprune_cost"]["params"].total(shares) == count_params(pruned)
    assert gm.meta["fxprune_cost"]["flops"].total(shares) == pytest.approx(count_flops(pruned, (x,)), rel=1e-9)


def test_a_block_whose_module_would_not_return_its_input_loses_its_branch_module_instead():
    model = nn.Sequential(Signed(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 16)
    gm = fxprune.analyze(model, (x,))
    found, _ = fxprune.blocks(gm)
    assert [(b.module, b.kind) for b in found] == [("0.f", "zero")]
    plan = Plan({}, (0,))
    shrunk = shrink_model(model, gm, plan)
    assert verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (x,), {}).ok
    gm = fxprune.analyze(nn.Sequential(Signed(inline=True), nn.Linear(16, 4)).eval(), (x,))
    found, why = fxprune.blocks(gm)
    assert found == [] and any("0 does not return its input" in reason for reason in why.values())


def test_a_branch_no_module_holds_alone_is_not_removable_and_says_so():
    gm = fxprune.analyze(InlineResidual().eval(), (torch.randn(4, 16),))
    found, why = fxprune.blocks(gm)
    assert found == [] and any("no module of the model holds the branch alone" in r for r in why.values())


def test_the_knapsack_removes_the_block_that_matters_least_where_thinning_cannot_reach_the_budget(residual_net):
    torch.manual_seed(0)
    model = _eval(residual_net(scales=(1.0, 1e-3, 1.0)))  # the middle block's branch is almost nothing
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(fxprune.BudgetError):  # every group keeps at least one 32-channel step
        fxprune.compile(model, fxprune.FLOPs(0.5), x, progress=False, round_to=32, depth=False)
    result = fxprune.compile(model, fxprune.FLOPs(0.5), x, progress=False, round_to=32)  # depth: the default
    report = fxprune.report(result)
    assert type(result) is residual_net and isinstance(result.blocks[1], Skip)
    assert report.blocks_removed == ["blocks.1"]
    assert report.flops_after <= 0.5 * report.flops_before
    assert any("1 of 3 removable residual blocks removed" in note for note in report.notes)
    assert "blocks removed (1): blocks.1" in str(report)


def test_depth_only_removes_the_blocks_that_matter_least_and_keeps_every_width(residual_net):
    torch.manual_seed(0)
    model = _eval(residual_net(scales=(1.0, 1e-3, 1.0)))  # the middle block's branch is almost nothing
    x = torch.randn(1, 3, 16, 16)
    result = fxprune.compile(model, fxprune.FLOPs(0.7), x, progress=False, depth="only")
    plan, report = fxprune.plan_of(result), fxprune.report(result)
    assert plan.keep == {} and report.blocks_removed == ["blocks.1"]  # widths all kept, the weakest block gone
    assert report.flops_after <= 0.7 * report.flops_before
    with pytest.raises(fxprune.errors.SolverError, match="depth='all'.*'only'"):
        fxprune.compile(model, fxprune.FLOPs(0.7), x, progress=False, depth="all")


def test_depth_on_a_model_without_blocks_is_width_only_and_the_report_says_so():
    model = torchvision.models.vgg11().eval()
    result = fxprune.compile(model, fxprune.FLOPs(0.5), torch.randn(1, 3, 32, 32), progress=False, depth=True)
    report = fxprune.report(result)
    assert report.blocks_removed == [] and report.flops_after <= 0.5 * report.flops_before
    assert any("no removable residual block" in note and "width-only" in note for note in report.notes)


def test_a_plan_with_removed_blocks_round_trips_as_json_and_bad_block_ids_are_refused(residual_net):
    plan = Plan({0: np.array([1, 2])}, (3, 1))
    again = Plan.from_json(plan.to_json())
    assert again.drop == (1, 3) and again.keep[0].tolist() == [1, 2]
    assert Plan.from_json(Plan({0: np.array([1])}).to_json()).drop == ()
    gm = fxprune.analyze(_eval(residual_net()), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(fxprune.PlanError, match="removable blocks are 0..2"):
        fxprune.prune(gm, Plan({}, (5,)))


def test_a_branch_module_the_models_code_adds_becomes_a_zero():
    class Tower(nn.Module):
        """Pre-norm MLP blocks added in the model's own forward, as Hugging Face decoders add theirs."""

        def __init__(self) -> None:
            super().__init__()
            self.mlps = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(),
                                                     nn.Linear(64, 16)) for _ in range(2)])
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            for mlp in self.mlps:
                x = x + mlp(x)
            return self.out(x)

    model = Tower().eval()
    x = torch.randn(2, 5, 16)
    gm = fxprune.analyze(model, (x,))
    found, _ = fxprune.blocks(gm)
    assert [(b.module, b.kind) for b in found] == [("mlps.0", "zero"), ("mlps.1", "zero")]
    plan = Plan({}, (1,))
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (x,), {})
    assert verification.ok, verification.failure
    assert isinstance(shrunk.mlps[1], ZeroBranch) and isinstance(shrunk.mlps[0], nn.Sequential)
    assert (x + ZeroBranch()(x)).equal(x)


@pytest.mark.parametrize("name, size", [("mobilenet_v3_small", 64), ("mobilenet_v3_large", 64), ("efficientnet_b0", 64),
                                        ("efficientnet_v2_s", 64), ("resnet50", 64), ("regnet_y_400mf", 64),
                                        ("mnasnet0_5", 64), ("convnext_tiny", 64), ("vit_b_32", 224),
                                        ("maxvit_t", 224)])
def test_zoo_families_lose_every_other_block_exactly_in_the_graph_and_their_own_class(name, size):
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    gm = fxprune.analyze(model, (x,))
    found, _ = fxprune.blocks(gm)
    assert len(found) >= 6 if name != "maxvit_t" else len(found) == 7  # maxvit: its MBConv blocks with a skip
    plan = fxprune.random_plan(gm, 0.5, seed=0, include_norm_coupled=False)
    plan.drop = tuple(range(0, len(found), 2))
    pruned = fxprune.prune(gm, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_forward(gm, plan, x), rtol=1e-4, atol=1e-4)
    shrunk = shrink_model(model, gm, plan)
    assert type(shrunk) is type(model)
    assert sum(isinstance(m, (Skip, ZeroBranch)) for m in shrunk.modules()) == len(plan.drop)
    verification = verify_model(model, shrunk, pruned, gm, plan, (x,), {})
    assert verification.ok, verification.failure


def test_a_shortcut_that_is_an_identity_module_is_seen_through():
    model = CifarResNet(20, in_channels=1, width=16).eval()  # self.shortcut = nn.Identity() where shapes agree
    x = torch.randn(2, 1, 16, 16)
    gm = fxprune.analyze(model, (x,))
    found, why = fxprune.blocks(gm)
    assert [b.module for b in found] == ["layers.0", "layers.1", "layers.2", "layers.4", "layers.5", "layers.7",
                                         "layers.8"]
    assert len(why) == 2  # the two blocks whose shortcut is a strided 1x1 convolution
    plan = Plan({}, (0, 3, 6))
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (x,), {})
    assert verification.ok, verification.failure
    assert [type(layer).__name__ for layer in shrunk.layers].count("Skip") == 3


def test_swins_attention_blocks_say_why_they_are_not_removable():
    gm = fxprune.analyze(torchvision.models.swin_t().eval(), (torch.randn(1, 3, 224, 224),))
    found, why = fxprune.blocks(gm)
    assert found == [] and len(why) == 24  # its code adds each branch inside the block: no module holds one alone
    assert all("no module of the model holds the branch alone" in reason for reason in why.values())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_consecutive_blocks_removed_leave_no_add_and_cost_exactly_what_the_models_keep(capture):
    model = torchvision.models.mobilenet_v2().eval()  # features.5 and .6 are consecutive blocks: 6's skip is 5's add
    x = torch.randn(1, 3, 64, 64)
    gm = fxprune.analyze(model, (x,), capture=capture)
    found, _ = fxprune.blocks(gm)
    plan = fxprune.random_plan(gm, 0.5, seed=0)
    plan.drop = tuple(range(len(found)))
    pruned = fxprune.prune(gm, plan)
    assert not any(node.target in (operator.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
                   for node in pruned.graph.nodes)
    shrunk = shrink_model(model, gm, plan)
    CostPass((x,))(gm)
    shares = kept_shares(gm, plan)
    assert gm.meta["fxprune_cost"]["params"].total(shares) == count_params(pruned) == count_params(shrunk)
    assert count_flops(pruned, (x,)) == pytest.approx(count_flops(shrunk, (x,)), rel=1e-9)
    with torch.no_grad():  # an exported graph returns a flat tuple
        expected = masked_forward(gm, plan, x)
        torch.testing.assert_close(pruned(x), expected[0] if isinstance(expected, tuple) else expected,
                                   rtol=1e-4, atol=1e-5)


class TwoKinds(nn.Module):
    """Two ReLU blocks and two sigmoid blocks (the only sigmoids of the model, their branches nearly nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 16))
                                    for act in (nn.ReLU, nn.ReLU, nn.Sigmoid, nn.Sigmoid))
        with torch.no_grad():
            for block in self.blocks[2:]:
                block[2].weight.mul_(1e-3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_a_plan_keeps_one_of_the_blocks_that_alone_compute_an_operation():
    torch.manual_seed(0)
    model, x = TwoKinds().eval(), torch.randn(2, 8)
    gm = fxprune.analyze(model, (x,))
    assert fxprune.analysis(gm).sole == [("Sigmoid", (2, 3))]  # the ReLUs and Linears run outside blocks too
    result = fxprune.compile(model, fxprune.FLOPs(0.55), x, progress=False, depth="only")
    removed = fxprune.report(result).blocks_removed
    assert len(removed) == 2 and sum(path in ("blocks.2", "blocks.3") for path in removed) == 1, removed
    assert fxprune.report(result).flops_after <= 0.55 * fxprune.report(result).flops_before
    assert "depth: one of blocks.2, blocks.3 is kept: only they compute Sigmoid" in fxprune.report(result).notes


class Mixing(nn.Module):
    """A branch through an op no rule knows (a cumulative sum across channels): its channels are frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.cumsum(self.up(x), dim=-1))


class FrozenBranches(nn.Module):
    """A prunable block and two blocks with frozen channels, the last one's branch nearly nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 4)
        self.plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.mixing_a, self.mixing_b = Mixing(), Mixing()
        with torch.no_grad():
            self.mixing_b.down.weight.mul_(1e-3)
            self.mixing_b.down.bias.zero_()

    def forward(self, x):
        x = self.stem(x)
        for block in (self.plain, self.mixing_a, self.mixing_b):
            x = x + block(x)
        return self.head(x)


def test_a_block_whose_channels_are_frozen_is_removed_whole_unless_kept():
    torch.manual_seed(0)
    model, x = FrozenBranches().eval(), torch.randn(2, 8)
    found, _ = fxprune.blocks(fxprune.analyze(model, (x,)))
    assert [(b.module, bool(b.groups)) for b in found] == [("plain", True), ("mixing_a", False), ("mixing_b", False)]
    pruned = fxprune.compile(model, fxprune.FLOPs(0.7), x, progress=False, depth="only")
    assert fxprune.report(pruned).blocks_removed == ["mixing_b"]  # what adds the least
    assert isinstance(pruned.mixing_b, ZeroBranch) and isinstance(model.mixing_b, Mixing)
    reference = FrozenBranches().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.mixing_b.down.weight.zero_()
        torch.testing.assert_close(pruned(x), reference(x))
    kept = fxprune.compile(model, fxprune.FLOPs(0.7), x, progress=False, depth="only", keep=["mixing_b"])
    removed = fxprune.report(kept).blocks_removed
    assert len(removed) == 1 and removed != ["mixing_b"]
    gm = fxprune.analyze(model, (x,))
    KeepPass(["mixing_b"], model)(gm)
    found, why = fxprune.blocks(gm)
    assert [b.module for b in found] == ["plain", "mixing_a"] and [b.id for b in found] == [0, 1]
    assert "kept: mixing_b matches keep='mixing_b'" in why.values()
