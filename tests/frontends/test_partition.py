"""Partitioned capture: a model no front end takes whole is pruned in the parts that are captured alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.frontends.partition import assemble, split


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Detector(nn.Module):
    """A detector's shape: a list of images in, features handed from a backbone to a head, then
    post-processing that branches on values (so neither torch.fx nor torch.export takes it whole)."""

    def __init__(self, read_features: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 32))
        self.head = nn.Sequential(_block(32, 24), nn.Conv2d(24, 6, 1))
        self.read_features = read_features

    def forward(self, images: list[torch.Tensor]) -> dict:
        x = torch.stack(images)
        features = self.backbone(x)
        assert features.shape[1] > 0  # a shape read: the channels may still change
        logits = self.head(features)
        if self.read_features:
            logits = logits + features.mean()  # a value read outside the parts: the features stay whole
        scores = logits.flatten(1).softmax(-1)
        if float(scores.max()) > 2:  # a branch on a value: no front end takes the whole model
            scores = -scores
        return {"top": scores.topk(4, dim=-1).values, "logits": logits}


def _images() -> tuple[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return ([torch.randn(3, 16, 16, generator=generator), torch.randn(3, 16, 16, generator=generator)],)


def test_a_model_no_front_end_takes_whole_is_captured_in_parts():
    gm = fxprune.analyze(Detector().eval(), _images())
    capture = fxprune.capture_of(gm)
    assert capture.path == "partitioned"
    assert [p.path for p in capture.parts] == ["backbone", "head"]
    assert {path for path, _ in capture.failed} == {"fx", "export", "export-strict"}
    assert capture.parts[1].coupled == ["backbone:0"]  # the features flow unchanged into the head
    # the stitched graph's parts, put back, are the model
    model = Detector().eval()
    gm = fxprune.analyze(model, _images())
    rebuilt = assemble(model, split(gm))
    with torch.no_grad():
        want, got = model(*_images()), rebuilt(*_images())
    assert torch.allclose(want["logits"], got["logits"], atol=1e-6)


def test_channels_read_outside_the_parts_are_kept():
    model = Detector(read_features=True).eval()
    gm = fxprune.analyze(model, _images())
    assert fxprune.capture_of(gm).parts[1].coupled == []
    pruned = fxprune.compile(model, fxprune.FLOPs(0.5), _images(), progress=False)
    assert pruned.backbone(torch.randn(1, 3, 16, 16)).shape[1] == 32


def test_coupled_features_are_pruned_across_parts_and_the_budget_is_over_the_whole_model():
    torch.manual_seed(0)
    model = Detector().eval()
    before = copy.deepcopy(model.state_dict())
    pruned = fxprune.compile(model, fxprune.FLOPs(0.5), _images(), progress=False)
    assert type(pruned) is Detector and type(pruned.backbone) is nn.Sequential  # parts shrunk in place
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    width = pruned.backbone(torch.randn(1, 3, 16, 16)).shape[1]
    assert width < 32  # the features' channels, shared by the backbone and the head, were pruned
    report = fxprune.report(pruned)
    flops = fxprune.count_flops(pruned, _images())
    assert flops == report.flops_after <= 0.5 * report.flops_before
    assert [p.path for p in report.parts] == ["backbone", "head"] and report.parts[1].coupled_inputs == 1
    assert "backbone" in str(report)
    with torch.no_grad():
        out = pruned(*_images())
    assert out["logits"].shape == (2, 6, 16, 16)


class Costly(Detector):
    """Most of its FLOPs in a matmul outside any part: pruning can't reach a low budget."""

    def forward(self, images):
        out = super().forward(images)
        x = torch.stack(images).flatten(1)
        gram = x.T @ x
        out["gram"] = gram @ gram
        return out


def test_an_unreachable_budget_says_what_share_is_prunable():
    with pytest.raises(fxprune.BudgetError, match=r"only \d+\.\d% of the model's flops .* in the parts") as raised:
        fxprune.compile(Costly().eval(), fxprune.FLOPs(0.5), _images(), progress=False)
    assert 0.5 < raised.value.smallest_share < 1  # the share that does not shrink, as the message states it
    assert f"Ask for more than {raised.value.smallest_share:.3f} of the model" in str(raised.value)


def test_a_budget_under_the_parts_smallest_plan_is_stated_of_the_whole_model():
    """The parts' planner refuses in the parts' terms; the user asked of the whole model, and is answered so."""
    stated = (r"reaches \d\.\d{3} of the whole model .* to their smallest they keep \d\.\d{3} of it\); "
              r"raise the budget, or")
    with pytest.raises(fxprune.BudgetError, match=stated) as raised:
        fxprune.compile(Detector().eval(), fxprune.FLOPs(0.05), _images(), progress=False, round_to=8)
    smallest = raised.value.smallest_share
    assert 0.05 < smallest < 1
    pruned = fxprune.compile(Detector().eval(), fxprune.FLOPs(smallest + 0.005), _images(), progress=False, round_to=8)
    report = fxprune.report(pruned)
    assert report.flops_after <= (smallest + 0.005) * report.flops_before


def test_save_load_and_onnx_of_a_model_in_parts(tmp_path):
    torch.manual_seed(0)
    model = Detector().eval()
    pruned = fxprune.compile(model, fxprune.Params(0.6), _images(), progress=False)
    loaded = fxprune.load(fxprune.save(pruned, tmp_path / "det.pt"))
    with torch.no_grad():
        want, got = pruned(*_images()), loaded(*_images())
    assert torch.equal(want["logits"], got["logits"])
    assert [p.path for p in fxprune.report(loaded).parts] == ["backbone", "head"]
    with pytest.raises(fxprune.SaveError, match=".pt"):
        fxprune.save(pruned, tmp_path / "det.pt2", _images())
    result = fxprune.export_onnx(pruned, tmp_path / "det.onnx", _images())
    assert result.output_names == ["top", "logits"]  # the model's outputs; its parts' were only for checking
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_a_conv_called_on_inputs_of_another_shape_is_checked_on_every_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if float(y.mean()) > 1e9:  # a branch on a value: no front end takes the whole
                return y
            return self.conv(F.avg_pool2d(y, 2))

    model = Twice().eval()
    gm = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    (part,) = fxprune.capture_of(gm).parts
    assert part.calls == 2
    assert fxprune.capture_of(gm).parts[0].path == "conv"


def test_only_parts_upstream_of_post_processing_are_raw():
    class TwoStage(Detector):
        """A second head fed by what post-processing picked: not comparable exactly across engines."""

        def __init__(self) -> None:
            super().__init__()
            self.refine = nn.Linear(32, 4)

        def forward(self, images):
            out = super().forward(images)
            features = self.backbone(torch.stack(images))
            picked = features.flatten(2).amax(-1)  # post-processing on the features
            out["refined"] = self.refine(picked)
            return out

    capture = fxprune.capture_of(fxprune.analyze(TwoStage().eval(), _images()))
    assert {p.path: p.raw for p in capture.parts} == {"backbone": True, "head": True, "refine": False}


def test_a_latency_budget_is_read_end_to_end_and_an_unreachable_one_states_the_prunable_share(tmp_path):
    """The matmul outside the parts is most of the model's latency on onnxruntime: no plan of the parts
    reaches half of the whole model's, and the error says how much pruning can touch."""
    with pytest.raises(fxprune.BudgetError, match=r"only \d+\.\d% of the model's latency .* in the parts"):
        fxprune.compile(Costly().eval(), fxprune.Latency(0.5), _images(), progress=False, cache=tmp_path)


def test_a_module_shared_under_two_names_is_one_part():
    class Shared(Detector):
        def __init__(self) -> None:
            super().__init__()
            self.alias = self.head  # the same module, registered twice

    capture = fxprune.capture_of(fxprune.analyze(Shared().eval(), _images()))
    assert [p.path for p in capture.parts] == ["backbone", "head"]
