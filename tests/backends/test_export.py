"""ONNX export: exporters, output structures, dynamic batch, large-model side files, model untouched, errors."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

import fxprune.backends.export as export_mod
from fxprune.backends.export import ExportResult, export_onnx, run_onnxruntime
from fxprune.errors import ExampleInputsError, ExportError

pytestmark = pytest.mark.export


@torch.library.custom_op("fxprune_test::opaque_double", mutates_args=())
def opaque_double(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no ONNX translation in either exporter."""
    return x * 2


@opaque_double.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class ConvBnReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class DictOut(ConvBnReluLinear):
    def forward(self, x: torch.Tensor) -> OrderedDict:
        features = torch.relu(self.bn(self.conv(x)))
        return OrderedDict(out=self.fc(features.mean((2, 3))), aux=features)


class TupleOut(ConvBnReluLinear):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(pooled) * scale, pooled


class CustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque_double(x) + 1


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this forward always fails")


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class BatchOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(1, 4) * 2


def _seeded(module: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics so that folding mistakes would show."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def _torch_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*inputs)
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else [out]
    return [v.numpy() for v in values]


def _assert_runs_at_batch(path, model: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int) -> None:
    """The ONNX file accepts a batch it was neither exported nor verified at, and agrees with torch there."""
    torch.manual_seed(batch)
    batched = tuple(torch.randn(batch, *x.shape[1:]) for x in inputs)
    got = run_onnxruntime(path, batched)
    want = _torch_outputs(model, batched)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.shape[0] == batch
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _batch_dim(path) -> list[str]:
    """dim_param of axis 0 of every graph input ('' when the axis is fixed)."""
    return [i.type.tensor_type.shape.dim[0].dim_param for i in onnx.load(str(path)).graph.input]


def test_conv_bn_relu_linear_graph_module(tmp_path):
    model = torch.fx.symbolic_trace(_seeded(ConvBnReluLinear()))
    x = torch.randn(1, 3, 16, 16)
    result = export_onnx(model, tmp_path / "tiny.onnx", (x,))
    assert isinstance(result, ExportResult)
    assert result.exporter == "dynamo"
    assert result.input_names == ["x"] and result.output_names == ["output"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.path.exists() and result.file_bytes == result.path.stat().st_size
    loaded = onnx.load(str(result.path))
    assert result.num_nodes == len(loaded.graph.node) > 0
    assert result.opset == next(o.version for o in loaded.opset_import if o.domain == "")
    onnx.checker.check_model(loaded, full_check=True)
    np.testing.assert_allclose(run_onnxruntime(result.path, (x,))[0], _torch_outputs(model, (x,))[0], atol=1e-4)


def test_dict_outputs_keep_keys_and_order(tmp_path):
    model = _seeded(DictOut())
    x = torch.randn(1, 3, 16, 16)
    result = export_onnx(model, tmp_path / "dict.onnx", (x,))
    assert result.output_names == ["out", "aux"]
    got = run_onnxruntime(result.path, (x,))
    assert [g.shape for g in got] == [(1, 5), (1, 8, 16, 16)]
    _assert_runs_at_batch(result.path, model, (x,), batch=3)


def test_tuple_outputs_and_two_inputs(tmp_path):
    model = _seeded(TupleOut())
    inputs = (torch.randn(1, 3, 8, 8), torch.randn(1, 1))
    result = export_onnx(model, tmp_path / "tuple.onnx", inputs)
    assert result.input_names == ["x", "scale"]
    assert result.output_names == ["output.0", "output.1"]
    assert _batch_dim(result.path)[0] and _batch_dim(result.path)[1]
    _assert_runs_at_batch(result.path, model, inputs, batch=3)


def test_resnet18_dynamic_batch(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = export_onnx(model, tmp_path / "resnet18.onnx", (x,))
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-3
    assert result.file_bytes > 40_000_000  # 11.7M float weights are in the file
    assert all(_batch_dim(result.path)), "batch axis must be symbolic"
    _assert_runs_at_batch(result.path, model, (x,), batch=3)
    # the image's sizes stay the example's unless asked: onnxruntime runs symbolic sizes slower
    image = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert not result.dynamic_sizes and [d.dim_value for d in image[2:]] == [64, 64]


def test_a_pruned_model_exports_with_dynamic_batch_and_image_size(tmp_path):
    """The model compile returns (the user's class) runs at any size, and so does its ONNX file."""
    import fxprune

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = fxprune.compile(model, fxprune.FLOPs(0.5), (x,), progress=False)
    result = export_onnx(pruned, tmp_path / "small.onnx", (x,), dynamic_sizes=True)
    assert result.dynamic_sizes and result.max_abs_diff <= 1e-3
    other = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = pruned(other).numpy()
    np.testing.assert_allclose(run_onnxruntime(result.path, (other,))[0], expected, rtol=1e-3, atol=1e-4)


def test_sizes_stay_fixed_where_the_model_takes_one_size(tmp_path):
    class FixedSize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    result = export_onnx(FixedSize().eval(), tmp_path / "fixed.onnx", (torch.randn(1, 3, 8, 8),))
    assert not result.dynamic_sizes and all(_batch_dim(result.path))


def test_model_is_not_modified(tmp_path):
    model = torch.fx.symbolic_trace(_seeded(ConvBnReluLinear()))
    model.train()
    model.fc.eval()  # mixed flags must come back per module, not as one model.train(...)
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    code = model.code
    export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.code == code


def test_static_batch_when_asked(tmp_path):
    model = BatchOne()
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        export_onnx(model, tmp_path / "dyn.onnx", (torch.randn(1, 4),))
    result = export_onnx(model, tmp_path / "static.onnx", (torch.randn(1, 4),), dynamic_batch=False)
    assert _batch_dim(result.path) == [""]
    assert result.max_abs_diff == 0.0


def test_requested_opset_is_honoured(tmp_path):
    model = _seeded(ConvBnReluLinear())
    x = torch.randn(1, 3, 8, 8)
    result = export_onnx(model, tmp_path / "op17.onnx", (x,), opset=17)
    assert result.opset == 17
    assert {o.domain: o.version for o in onnx.load(str(result.path)).opset_import}.get("") == 17
    _assert_runs_at_batch(result.path, model, (x,), batch=3)


def test_torchscript_fallback_when_dynamo_fails(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable")

    monkeypatch.setattr(export_mod, "_export_dynamo", refuse)
    model = _seeded(DictOut())
    x = torch.randn(1, 3, 8, 8)
    result = export_onnx(model, tmp_path / "ts.onnx", (x,))
    assert result.exporter == "torchscript"
    assert result.output_names == ["out", "aux"]
    _assert_runs_at_batch(result.path, model, (x,), batch=3)


def test_external_data_for_large_models(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    x = torch.randn(1, 64)
    result = export_onnx(model, tmp_path / "big.onnx", (x,))
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size >= 64 * 128 * 4
    assert result.file_bytes == result.path.stat().st_size + data.stat().st_size
    assert result.path.stat().st_size < 64 * 128 * 4  # the weights are not inline
    onnx.checker.check_model(str(result.path), full_check=True)
    _assert_runs_at_batch(result.path, model, (x,), batch=3)


@pytest.mark.parametrize("bad", [torch.randn(1, 4), [torch.randn(1, 4)], (), (torch.randn(1, 4), 3)])
def test_example_inputs_must_be_a_tuple_of_tensors(tmp_path, bad):
    with pytest.raises(ExampleInputsError):
        export_onnx(nn.Linear(4, 2), tmp_path / "m.onnx", bad)
    assert not (tmp_path / "m.onnx").exists()


def test_inputs_that_do_not_fit_the_model(tmp_path):
    with pytest.raises(ExampleInputsError, match="channels"):
        export_onnx(ConvBnReluLinear().eval(), tmp_path / "m.onnx", (torch.randn(1, 4, 8, 8),))
    with pytest.raises(ExampleInputsError, match="always fails"):
        export_onnx(Raises(), tmp_path / "m.onnx", (torch.randn(1, 4),))


def test_op_without_onnx_lowering(tmp_path):
    with pytest.raises(ExportError, match="both exporters") as info:
        export_onnx(CustomOp(), tmp_path / "m.onnx", (torch.randn(2, 4),))
    assert "opaque_double" in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_mismatch_reports_output_and_difference(tmp_path):
    with pytest.raises(ExportError, match=r"output 'output' differs from torch by [0-9.]+"):
        export_onnx(Noisy(), tmp_path / "m.onnx", (torch.randn(1, 4),))
    result = export_onnx(Noisy(), tmp_path / "unchecked.onnx", (torch.randn(1, 4),), verify=False)
    assert result.max_abs_diff is None


class _Pools(nn.Module):
    """A squeeze-excitation (adaptive average pooling, dims kept), then a mean that drops the dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.excite = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.excite(self.pool(y)))
        return y.mean((1, 3), keepdim=True), y.mean((2, 3))


def test_average_pooling_over_the_whole_image_is_written_as_onnxs_global_pool(tmp_path):
    model, x = _Pools().eval(), torch.randn(2, 3, 12, 12)
    export_onnx(model, tmp_path / "pools.onnx", (x,))  # verified against the model in onnxruntime
    ops = [node.op_type for node in onnx.load(str(tmp_path / "pools.onnx")).graph.node]
    assert ops.count("GlobalAveragePool") == 1  # the SE block's pooling, not the means over other axes
    assert ops.count("ReduceMean") == 2  # (1, 3) is not the spatial axes; (2, 3) without dims kept is not a pool
