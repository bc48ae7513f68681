"""Interim latency model: each layer timed once at full width in torch eager, scaled with its widths.

A placeholder for the engine-measured lookup tables of the latency issue: convolutions and linear
layers are timed alone (median of repeated runs), their time scales with their input and output
widths like their FLOPs, and the rest of the model is a constant measured as whole-model time minus the
layers. ``measure_latency`` times whole models on torch or onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.utils import benchmark

from fxprune.errors import FxpruneError
from fxprune.passes.cost import CostModel, CostTerm, _module_scaling

ENGINES = ("onnxruntime", "torch")


def _median_ms(fn, min_run_time: float) -> float:
    with torch.no_grad():
        fn()  # warm-up
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure_latency(model: nn.Module, example_inputs: tuple, engine: str = "torch",
                    min_run_time: float = 0.5) -> float:
    """Median latency in ms of one forward pass of ``model`` on ``engine``, after warm-up."""
    if engine not in ENGINES:
        raise FxpruneError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return _median_ms(lambda: model(*example_inputs), min_run_time)
    import onnxruntime as ort

    from fxprune.passes.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, example_inputs, verify=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example_inputs)}
        return _median_ms(lambda: session.run(None, feeds), min_run_time)


class _LayerTimer(torch.fx.Interpreter):
    """Runs the graph once, timing every convolution and linear layer alone."""

    def __init__(self, gm: torch.fx.GraphModule, min_run_time: float) -> None:
        super().__init__(gm)
        self.min_run_time = min_run_time
        self.terms: list[CostTerm] = []

    def call_module(self, target, args, kwargs):
        module = self.module.get_submodule(target)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            node = self._current
            spaces = _module_scaling(module, node)["weight"]
            self.terms.append(CostTerm(node.name, _median_ms(lambda: module(*args, **kwargs), self.min_run_time),
                                       spaces))
        return super().call_module(target, args, kwargs)

    def run_node(self, n: torch.fx.Node):
        self._current = n
        return super().run_node(n)


def latency_cost(gm: torch.fx.GraphModule, example_inputs: tuple, engine: str = "onnxruntime",
                 min_run_time: float = 0.05) -> CostModel:
    """Latency in ms as a function of kept widths (see the module docstring for the model)."""
    timer = _LayerTimer(gm, min_run_time)
    with torch.no_grad():
        timer.run(*example_inputs)
    layers_ms = sum(t.full for t in timer.terms)
    torch_ms = measure_latency(gm, example_inputs, "torch", min_run_time=10 * min_run_time)
    whole_ms = torch_ms if engine == "torch" else measure_latency(gm, example_inputs, engine, 10 * min_run_time)
    scale = whole_ms / torch_ms  # onnxruntime: layer shares from torch, total from the engine
    model = CostModel("latency", [CostTerm(t.what, t.full * scale, t.spaces) for t in timer.terms])
    model.terms.append(CostTerm("rest of the model", max(whole_ms - layers_ms * scale, 0.0)))
    model.baseline = model.total({})
    return model
