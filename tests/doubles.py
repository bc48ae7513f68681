"""Test doubles: an engine whose latency is known, and small models for the command line's tests
(``tests.doubles:tiny_cnn``)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

from fxprune.backends.engines import Deployed, Engine, KernelTime, UnitTiming
from fxprune.ir import graph
from fxprune.passes.pipeline import analyze
from fxprune.rules import RULES
from fxprune.rules.units import find_units


# --- an engine whose latency is known ---------------------------------------------------------------
def _layers(module: torch.nn.Module, example_inputs: tuple) -> list:
    """The unit specs of every convolution and linear layer of ``module``, prunable or not."""
    gm = analyze(module, example_inputs)
    found = []
    for node in gm.graph.nodes:
        rule = RULES.recorded(node)
        spec = rule.unit(gm, node) if rule is not None and graph.space(node) is not None else None
        if spec is not None:
            found.append(spec)
    return found


class SyntheticEngine(Engine):
    """A deterministic engine for tests: a unit takes ``unit_ms`` (bilinear in its widths), the reference
    0.5 ms, and a whole model the sum of its layers (prunable or not) over (1 - memory share - overhead share)."""

    name = "synthetic"
    memory_share, overhead_share = 0.1, 0.05

    def __init__(self) -> None:
        super().__init__(threads=1)
        self.unit_calls = 0

    def version(self) -> str:
        return "1"

    @staticmethod
    def unit_ms(spec, width_in: int, width_out: int) -> float:
        area = int(np.prod(spec.input_shape[2:])) if spec.kernel else 1  # a convolution's positions
        return 1e-6 * area * (width_in * width_out / (spec.groups if spec.tied else 1) + 3 * width_out) + 0.01

    def measure_units(self, spec, points) -> UnitTiming:
        self.unit_calls += 1
        return UnitTiming(np.array([self.unit_ms(spec, i, o) for i, o in points]), np.full(len(points), 0.5))

    def in_model_ms(self, spec) -> float:
        """A unit's kernel time inside a whole model (what a profile of the model shows): its own latency."""
        return self.unit_ms(spec, spec.in_channels, spec.out_channels)

    def kernels(self, module: torch.nn.Module, example_inputs: tuple) -> list[KernelTime]:
        """A whole model's profile: a kernel per unit, named by its shapes as onnxruntime's profile does."""
        return [KernelTime("Conv" if u.spec.kernel else "Gemm",
                           [list(u.spec.input_shape), list(u.spec.weight_shapes[0])],
                           [list(u.spec.output_shape)], 1e3 * self.in_model_ms(u.spec))
                for u in find_units(analyze(module, example_inputs))]

    def model_ms(self, module: torch.nn.Module, example_inputs: tuple) -> float:
        """Every layer's latency (frozen ones too: a copy whose heads were cut to one per layer freezes them
        in its own analysis, yet runs them), over the layers' share of the whole."""
        total = sum(self.unit_ms(spec, spec.in_channels, spec.out_channels) for spec in _layers(module, example_inputs))
        return total / (1 - self.memory_share - self.overhead_share)

    @contextmanager
    def deploy(self, module, example_inputs):
        engine, ms = self, self.model_ms(module, example_inputs)
        kernels = self.kernels(module, example_inputs)

        class Synthetic(Deployed):
            latency_ms = ms

            def kernels(self) -> list[KernelTime]:
                return kernels

            def run(self) -> None:
                return None

            def split(self) -> tuple[float, float]:
                return engine.memory_share, engine.overhead_share
        yield Synthetic()

    def time_interleaved(self, runners, rounds=1, seconds=0.0) -> list[float]:
        return [run.__self__.latency_ms for run in runners]

    def time_round(self, run, seconds=0.0, warmup=1) -> float:
        return run.__self__.latency_ms


class CurvedEngine(SyntheticEngine):
    """A whole model takes its units' sum to the power 1.5: two calibration points (full, reduced) and
    a straight line between them mispredict every plan in between, as real engines do less smoothly.
    Counts the models it deploys."""

    name = "synthetic-curved"

    def __init__(self) -> None:
        super().__init__()
        self.deployed = 0

    def model_ms(self, module, example_inputs) -> float:
        self.deployed += 1
        return super().model_ms(module, example_inputs) ** 1.5


class CountsDeployments:
    """A test engine that counts how often the analysed model is deployed (``traced_deployments``)."""

    traced_deployments = 0

    def deploy_traced(self, gm, example_inputs, cache, digest):
        self.traced_deployments += 1
        return super().deploy_traced(gm, example_inputs, cache, digest)


class CountingEngine(CountsDeployments, SyntheticEngine):
    """The synthetic engine, counting deployments of the analysed model."""


class CountingCurvedEngine(CountsDeployments, CurvedEngine):
    """The curved engine, counting deployments of the analysed model."""


class Contended(CurvedEngine):
    """The curved engine on a busier machine: every whole model runs ``factor`` x slower, and models with fewer
    parameters than ``full_params`` a further ``small`` x (contention slows a small model more than a large one)."""

    def __init__(self, factor: float, small: float = 1.0, full_params: int = 0) -> None:
        super().__init__()
        self.factor, self.small, self.full_params = factor, small, full_params

    def model_ms(self, module, example_inputs) -> float:
        ms = super().model_ms(module, example_inputs) * self.factor
        return ms * self.small if sum(p.numel() for p in module.parameters()) < self.full_params else ms


def tiny_cnn() -> torch.nn.Module:
    """A small convolutional classifier (for the command line's tests: ``tests.doubles:tiny_cnn``)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class SplitBlock(nn.Module):
    """YOLOv8's C2f pattern: ``list(x.chunk(2, 1))`` iterates a tensor, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        parts = list(self.stem(x).chunk(2, 1))
        parts.append(torch.relu(self.inner(parts[-1])))
        return {"features": self.head(torch.cat(parts, 1)), "aux": (x.mean((2, 3)), [x.sum()])}


def split_block() -> SplitBlock:
    """A model torch.fx cannot trace and torch.export can (for tests and the command line)."""
    return SplitBlock().eval()


def tiny_llama() -> torch.nn.Module:
    """A Llama of 2 layers, 4 query and 2 kv heads (``tests.doubles:tiny_llama`` on the command line)."""
    import transformers  # a test extra, needed by the tests that name this factory only

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()
