"""INT8: quantized units and models on onnxruntime's CPU provider, and ONNX files written quantized."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

import fxprune
from fxprune.backends.export import run_onnxruntime
from fxprune.backends.ort import OnnxRuntimeEngine, OnnxRuntimeInt8Engine
from fxprune.backends.quantize import quantize_int8, settings
from fxprune.backends.registry import get_engine
from fxprune.cli import main
from fxprune.ir.units import Activation
from fxprune.rules.conv import ConvUnit
from fxprune.rules.units import REFERENCE
from tests.doubles import tiny_cnn

INPUTS = (torch.randn(1, 3, 32, 32),)


def _ops(model: bytes | str) -> set[str]:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    return {node.op_type for node in proto.graph.node}


def test_a_quantized_model_holds_qdq_pairs_and_computes_close_to_fp32(tmp_path):
    path = tmp_path / "fp32.onnx"
    fxprune.export_onnx(tiny_cnn().eval(), path, INPUTS)
    batches = [{"input": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)} for i in range(4)]
    quantized = quantize_int8(path, batches)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= _ops(quantized)
    (tmp_path / "int8.onnx").write_bytes(quantized)
    expected, got = (run_onnxruntime(p, INPUTS)[0] for p in (path, tmp_path / "int8.onnx"))
    assert np.abs(expected - got).max() < 0.1 * np.abs(expected).max()


def test_the_int8_engine_is_its_own_cache_key_and_times_quantized_units():
    int8, fp32 = get_engine("onnxruntime-int8"), OnnxRuntimeEngine()
    assert isinstance(int8, OnnxRuntimeInt8Engine) and int8.identity() != fp32.identity()
    assert int8.identity()["quantization"] == settings() and int8.identity()["engine"] == "onnxruntime-int8"
    spec = ConvUnit((1, 64, 14, 14), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True,
                    Activation("relu"))
    timing = int8.measure_units(spec, [(64, 64), (16, 16)])
    assert np.all(timing.ms > 0) and timing.ms[0] > timing.ms[1] and np.all(timing.spread >= 0)
    assert REFERENCE.out_channels == 64


def test_compile_for_the_int8_engine_reports_int8_and_fp32_latency(tmp_path):
    calibration = [(torch.randn(1, 3, 32, 32), torch.tensor([0])) for _ in range(2)]
    engine = OnnxRuntimeInt8Engine(threads=1)
    pruned = fxprune.compile(tiny_cnn().eval(), fxprune.Latency(0.7), INPUTS, engine=engine,
                             measure=True, refine=1, progress=False, cache=tmp_path, calibration=calibration,
                             importance="l1")
    assert engine.calibration == []  # the engine passed in is left as it was
    report = fxprune.report(pruned)
    text = str(report)
    assert report.engine == "onnxruntime-int8" and "latency on onnxruntime-int8" in text
    assert report.measured_latency_ms_before > 0 and report.fp32_latency_ms_before > 0
    assert "the FP32 models on onnxruntime" in text and report.budget_share == 0.7
    assert any(g.kept < g.total for g in report.groups)
    checked = re.search(r"(\d+) of (\d+) layers checked against the whole model", text)
    assert checked and int(checked.group(1)) > 0  # the tables are checked against QLinearConv kernels too


def test_export_writes_the_int8_model_checked_against_fp32(tmp_path):
    model = tiny_cnn().eval()
    result = fxprune.export_onnx(model, tmp_path / "int8.onnx", INPUTS, quantize="int8",
                                 calibration=[torch.randn(1, 3, 32, 32) for _ in range(3)])
    assert result.quantized == "int8" and "QuantizeLinear" in _ops(str(result.path))
    assert result.int8_max_abs_diff is not None and np.isfinite(result.int8_max_abs_diff)
    assert 0.0 <= result.int8_top1_agreement <= 1.0
    with torch.no_grad():
        scale = float(model(INPUTS[0]).abs().max())
    assert result.int8_max_abs_diff < 0.2 * scale
    with pytest.raises(fxprune.ExportError, match="quantize='int8'"):
        fxprune.export_onnx(model, tmp_path / "x.onnx", INPUTS, quantize="fp16")
    with pytest.raises(fxprune.ExportError, match="calibration batches"):
        fxprune.export_onnx(model, tmp_path / "y.onnx", INPUTS, quantize="int8",
                            calibration=[(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))])


def test_the_cli_writes_a_quantized_file_and_refuses_quantize_without_onnx(tmp_path, capsys):
    output = tmp_path / "small.onnx"
    assert main(["prune", "tests.doubles:tiny_cnn", "--input-shape", "1,3,32,32", "--budget", "flops:0.6",
                 "--quantize", "int8", "-o", str(output)]) == 0
    assert "INT8: max abs diff vs FP32" in capsys.readouterr().out and "QuantizeLinear" in _ops(str(output))
    assert main(["prune", "tests.doubles:tiny_cnn", "--input-shape", "1,3,32,32", "--budget", "flops:0.6",
                 "--quantize", "int8", "-o", str(tmp_path / "small.pt")]) != 0
    assert "add -o NAME.onnx" in capsys.readouterr().err
