"""ultralytics YOLO pruned and used as ultralytics uses it: loaded by ``YOLO(path)``, validated, trained one
epoch (at the pruned widths) and exported, on a dataset of generated images written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fxprune
from examples.yolo.train import demo_dataset
from fxprune.modules import Skip, ZeroBranch
from fxprune.passes.shrink import shrink_model
from fxprune.passes.verify import verify_model
from fxprune.yolo import pruned_trainer

ultralytics = pytest.importorskip("ultralytics")


def _widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _analysed(yaml: str):
    """A detector built from its yaml (random weights, 2 classes), an input, its graph and removable blocks."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(yaml, nc=2, verbose=False).eval()
    x = torch.randn(1, 3, 128, 128)
    gm = fxprune.analyze(model, (x,))
    return model, x, gm, fxprune.blocks(gm)[0]


def test_a_pruned_yolo_loads_validates_trains_and_exports_in_ultralytics(tmp_path, monkeypatch):
    from ultralytics.nn.tasks import DetectionModel

    monkeypatch.chdir(tmp_path)  # ultralytics writes runs/ where it is called
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False).eval()
    pruned = fxprune.compile(model, fxprune.FLOPs(0.6), (torch.randn(1, 3, 128, 128),), progress=False)
    assert type(pruned) is DetectionModel
    assert sum(_widths(pruned)) < sum(_widths(model))
    with torch.no_grad():  # other sizes and batches than the example's (ultralytics' default is 640)
        assert pruned(torch.randn(2, 3, 320, 256))[0].shape[:2] == (2, 6)

    path = fxprune.save(pruned, tmp_path / "yolo.pt")
    yolo = ultralytics.YOLO(str(path))
    assert _widths(yolo.model) == _widths(pruned)
    assert fxprune.plan_of(fxprune.load(path)) is not None

    data = demo_dataset(tmp_path / "data")
    options = dict(data=str(data), imgsz=64, batch=4, device="cpu", workers=0, plots=False, verbose=False)
    metrics = yolo.val(**options)
    assert metrics.box.map >= 0.0
    yolo.train(epochs=1, trainer=pruned_trainer(), amp=False, val=False, project=str(tmp_path / "runs"),
               name="train", exist_ok=True, **options)
    assert _widths(yolo.model) == _widths(pruned)  # trained at the pruned widths
    last = tmp_path / "runs" / "train" / "weights" / "last.pt"
    assert last.exists() and _widths(ultralytics.YOLO(str(last)).model) == _widths(pruned)
    onnx_file = ultralytics.YOLO(str(last)).export(format="onnx", imgsz=64)
    assert Path(onnx_file).exists()



def test_a_yolo_without_some_of_its_bottlenecks_loads_and_runs_in_ultralytics(tmp_path):
    model, x, gm, found = _analysed("yolov8n.yaml")
    assert [b.module for b in found][:3] == ["model.2.m.0", "model.4.m.0", "model.4.m.1"]  # C2f bottlenecks
    plan = fxprune.random_plan(gm, 0.6, seed=0)
    plan.drop = (1, 3)
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (x,), {})
    assert verification.ok, verification.failure
    shrunk.meta = {"fxprune_plan": plan}
    yolo = ultralytics.YOLO(str(fxprune.save(shrunk, tmp_path / "yolo.pt")))
    assert isinstance(yolo.model.model[4].m[0], Skip) and not isinstance(yolo.model.model[4].m[1], Skip)
    with torch.no_grad():
        torch.testing.assert_close(yolo.model.float().eval()(x)[0], shrunk(x)[0], rtol=1e-4, atol=1e-4)


def test_yolo11n_c3k2_bottlenecks_and_attention_branch_are_removed_exactly_and_load_in_ultralytics(tmp_path):
    model, x, gm, found = _analysed("yolo11n.yaml")
    kinds = [b.kind for b in found]
    # the PSA block's attention and its feed-forward (heads frozen: no channel group inside, removed whole)
    assert kinds.count("skip") == 11 and kinds.count("zero") == 2
    assert [b.module for b in found if b.kind == "zero"] == ["model.10.m.0.attn", "model.10.m.0.ffn"]
    zero = {i for i, kind in enumerate(kinds) if kind == "zero"}
    plan = fxprune.Plan({}, tuple(sorted(set(range(0, len(found), 2)) | zero)))
    shrunk = shrink_model(model, gm, plan)
    verification = verify_model(model, shrunk, fxprune.prune(gm, plan), gm, plan, (x,), {})
    assert verification.ok, verification.failure
    shrunk.meta = {"fxprune_plan": plan}
    yolo = ultralytics.YOLO(str(fxprune.save(shrunk, tmp_path / "yolo11.pt")))
    assert isinstance(yolo.model.model[10].m, Skip)  # both branches of its one PSA block gone: it passes x on
    assert sum(isinstance(m, (Skip, ZeroBranch)) for m in yolo.model.modules()) == len(plan.drop) - 1
    with torch.no_grad():
        torch.testing.assert_close(yolo.model.float().eval()(x)[0], shrunk(x)[0], rtol=1e-4, atol=1e-4)
