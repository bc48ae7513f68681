"""The onnxruntime engine: the CPU execution provider with every graph optimization, as deployed.

Units are timed from onnxruntime's profiler: one session holds a branch per table point
(``backends/onnx_units.py``) and each branch's time is the sum of its own kernels. The profiler adds a
few microseconds to every kernel it times (7 µs of a 0.3 µs addition here), which would make small
layers look slow; ``profiler_overhead`` measures that once per engine and every kernel time has it
taken off. Whole models are timed on ``session.run`` without the profiler; a second, profiled session
only says how that time divides between layer kernels and memory-bound kernels.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fxprune.backends.engines import Deployed, Engine, KernelTime, UnitTiming, quiet, spread
from fxprune.backends.export import _run_torch, export_onnx
from fxprune.backends.onnx_resize import ResizeError, fill, name_transposes, remove_blocks, resize, strip
from fxprune.backends.onnx_units import IR_VERSION, OPSET, branch_weight_bytes, unit_model, unit_prefix
from fxprune.backends.quantize import quantize_int8, settings
from fxprune.cache import LatencyCache
from fxprune.errors import EngineUnavailableError, LatencyError
from fxprune.ir.keys import PLAN_KEY
from fxprune.ir.units import UnitSpec
from fxprune.rules import RULES
from fxprune.rules.units import REFERENCE

# Kernels onnxruntime adds itself, of no operation of the model (layout reorders, the boundaries of an INT8
# model), that move memory like the memory-bound kernels the rules name (RULES.memory_kernels).
OWN_MEMORY_KERNELS = frozenset({"ReorderInput", "ReorderOutput", "QuantizeLinear", "DequantizeLinear"})
SESSION_WEIGHT_BYTES = 256 << 20  # weights of one measuring session; more points go to another session
OVERHEAD_CHAIN = 64  # trivial kernels timed to measure what the profiler adds
REFERENCES = 2  # reference branches in every measuring session
GRAPH_FORMAT = 2  # of cached exported graphs: raise it when passes/export.py changes what a graph holds
logger = logging.getLogger("fxprune")


@dataclass
class _Kernel:
    """One kernel of an onnxruntime profile: op type, input and output shapes, µs per timed run."""

    op: str
    inputs: list[list[int]]
    outputs: list[list[int]]
    us: list[float] = field(default_factory=list)


@dataclass
class _Profile:
    """A profiled session's timed runs: every kernel, and the whole runs (µs)."""

    kernels: dict[str, _Kernel]
    runs: list[float]


class OnnxRuntimeEngine(Engine):
    """onnxruntime's CPU execution provider, all graph optimizations, ``threads`` intra-op threads."""

    name = "onnxruntime"
    provider = "CPUExecutionProvider"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._overhead: tuple[float, float] | None = None

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def check_available(self) -> None:
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise EngineUnavailableError(f"onnxruntime here has no {self.provider} (it has "
                                         f"{', '.join(onnxruntime.get_available_providers())}); install the "
                                         "onnxruntime package built for it, or use engine='onnxruntime'")

    def runnable(self, model: bytes | str, batches: Callable[[], list[dict[str, np.ndarray]]]) -> bytes | str:
        """``model`` (an FP32 ONNX file or its bytes) as this engine runs it: as it is. ``batches()`` (feeds)
        is what an engine that quantizes calibrates on."""
        return model

    def session(self, model: bytes | str, profile_dir: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(profile_dir, "fxprune")
        return ort.InferenceSession(model, options, providers=[self.provider])

    # --- the profiler ------------------------------------------------------------------------------
    def _profile(self, model: bytes | str, feeds: dict) -> _Profile:
        """Warm-up and ``repeats`` runs of a fresh profiled session."""
        with tempfile.TemporaryDirectory() as tmp:
            session = self.session(model, tmp)
            for _ in range(self.warmup + self.repeats):
                session.run(None, feeds)
            with open(session.end_profiling()) as file:
                events = json.load(file)
        kernels: dict[str, _Kernel] = {}
        runs = []
        for event in events:
            name = event.get("name", "")
            if name == "model_run":
                runs.append(float(event["dur"]))
            elif event.get("cat") == "Node" and name.endswith("_kernel_time"):
                args = event.get("args", {})
                kernel = kernels.setdefault(name[: -len("_kernel_time")], _Kernel(
                    args.get("op_name", ""), [_shape(t) for t in args.get("input_type_shape", [])],
                    [_shape(t) for t in args.get("output_type_shape", [])]))
                kernel.us.append(float(event["dur"]))
        for kernel in kernels.values():
            kernel.us = kernel.us[-self.repeats:]
        return _Profile(kernels, runs[-self.repeats:])

    def profiler_overhead(self) -> tuple[float, float]:
        """µs the profiler adds to each kernel's time, and to the whole run per kernel, from a chain of
        trivial additions timed with and without it (once per engine)."""
        if self._overhead is None:
            model = _trivial_chain(OVERHEAD_CHAIN).SerializeToString()
            feeds = {"x": np.ones(1, dtype=np.float32)}
            session = self.session(model)
            wall_us = self.time_interleaved([lambda: session.run(None, feeds)], rounds=4, seconds=0.1)[0] * 1e3
            profile = self._profile(model, feeds)
            per_kernel = float(np.median([quiet(k.us) for k in profile.kernels.values()])) - wall_us / OVERHEAD_CHAIN
            per_node = (quiet(profile.runs) - wall_us) / OVERHEAD_CHAIN
            self._overhead = (max(per_kernel, 0.0), max(per_node, 0.0))
        return self._overhead

    def _kernel_us(self, kernel: _Kernel) -> np.ndarray:
        """A kernel's µs per run, with what the profiler adds taken off."""
        return np.maximum(np.asarray(kernel.us) - self.profiler_overhead()[0], 0.0)

    # --- units --------------------------------------------------------------------------------------
    def measure_units(self, spec: UnitSpec, points: list[tuple[int, int]]) -> UnitTiming:
        """Each session also runs REFERENCE twice; every branch's time is taken relative to it, run by run,
        so a session that ran while the machine was slow gives the same table as one that did not."""
        if spec.dtype != "float32":
            raise LatencyError(f"this model computes in {spec.dtype}, and fxprune times onnxruntime's CPU provider "
                               "in float32: compile the float32 model (then convert the pruned one), or pass "
                               "engine='torch'")
        total, reference, spreads = (np.full(len(points), np.nan) for _ in range(3))
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal(spec.input_shape).astype(np.float32),
                 "reference_x": rng.standard_normal(REFERENCE.input_shape).astype(np.float32)}
        for chunk in _chunks([branch_weight_bytes(spec, *p) for p in points], SESSION_WEIGHT_BYTES):
            model = unit_model(spec, [points[i] for i in chunk], chunk[0], REFERENCE, REFERENCES)
            profile = self._profile(self.runnable(model.SerializeToString(), lambda: [feeds]), feeds)
            per_branch: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(self.repeats))
            references = []
            for node, kernel in profile.kernels.items():
                if len(kernel.us) != self.repeats:
                    continue
                if _branch_of(node, "r") is not None:
                    references.append(self._kernel_us(kernel))
                branch = _branch_of(node, "u")
                if branch is not None and kernel.op != "DequantizeLinear":  # in a network, the next layer reads int8
                    per_branch[branch] += self._kernel_us(kernel)
            if not references:
                raise LatencyError("onnxruntime's profile has no kernel of the reference branches; their names changed")
            reference_runs = np.maximum(np.sum(references, axis=0) / REFERENCES, 1e-9)
            for index in chunk:
                if index not in per_branch:
                    raise LatencyError(f"onnxruntime's profile has no kernel of branch {unit_prefix(index)} "
                                       f"({spec.describe()}); its node names changed")
                ratios = per_branch[index] / reference_runs
                reference[index] = quiet(reference_runs) / 1e3
                total[index] = float(np.median(ratios)) * reference[index]
                spreads[index] = spread(ratios)
        return UnitTiming(total, reference, spreads)

    # --- whole models -------------------------------------------------------------------------------
    @contextmanager
    def deploy(self, module: nn.Module, example_inputs: tuple) -> Iterator[_OrtDeployed]:
        with _exported(module, example_inputs) as path:
            source = self.runnable(path, lambda: self.batches(onnx.load(path), example_inputs))
            session = self.session(source)
            yield _OrtDeployed(self, source, session, _feeds(session.get_inputs(), example_inputs),
                               module.state_dict(), "exported", fp32=path)

    def unquantized(self) -> "OnnxRuntimeEngine | None":
        """The FP32 engine whose models this one quantizes (what quantizing bought is timed on it); None here."""
        return None

    def batches(self, graph: onnx.ModelProto, example_inputs: tuple) -> list[dict[str, np.ndarray]]:
        """What a whole model is calibrated on (an engine that quantizes): the example's feeds."""
        return [_feeds(_graph_inputs(graph), example_inputs)]

    @contextmanager
    def deploy_traced(self, gm: torch.fx.GraphModule, example_inputs: tuple, cache: LatencyCache,
                      digest: str) -> Iterator[_OrtDeployed]:
        """The analysed model from its exported graph, which the cache keeps without weights (``fill``
        puts the module's back), so a warm compile exports nothing."""
        key = {"kind": "onnx", "model": digest, "exporter": _exporter_versions(),
               "batch": "static"}

        def export() -> dict:
            with _exported(gm, example_inputs) as path:
                graph = onnx.load(path)
            name_transposes(graph, gm.state_dict())
            graph = strip(graph)
            return {"onnx": base64.b64encode(graph.SerializeToString()).decode("ascii")}

        graph = cache.get_or_measure(key, export, _parse_graph)
        tensors = gm.state_dict()
        yield self._load(graph, fill(strip(graph), tensors), example_inputs, tensors, "exported graph")

    @contextmanager
    def deploy_pruned(self, full: Deployed, module: nn.Module, example_inputs: tuple) -> Iterator[Deployed]:
        """``module``, a pruned copy of the model ``full`` runs, from ``full``'s graph resized to its widths
        (``passes/onnx_resize.py``: milliseconds where an export takes seconds); exported where the graph
        holds a width that cannot be resized with certainty."""
        try:
            if not isinstance(full, _OrtDeployed):
                raise ResizeError("the full model was not deployed on onnxruntime")
            plan = getattr(module, "meta", {}).get(PLAN_KEY)
            graph = full.graph()
            if plan is not None and plan.drop:  # the full model's graph still computes them
                graph = remove_blocks(graph, full.tensors, module.state_dict(), len(plan.drop))
            graph = resize(graph, _shapes(full.tensors), _shapes(module.state_dict()))
            expected = [tuple(x.shape) for _, x in _run_torch(module, example_inputs)]
            try:
                tensors = module.state_dict()
                deployed = self._load(graph, fill(graph, tensors), example_inputs, tensors, "resized graph")
                got = [tuple(np.shape(x)) for x in deployed.run()]
            except Exception as error:  # onnxruntime raises its own exception family
                raise ResizeError(f"onnxruntime rejects the resized graph: {error}") from error
            if got != expected:
                raise ResizeError(f"the resized graph's outputs are {got}, the model's {expected}")
        except ResizeError as why:
            logger.info("fxprune: exporting the pruned model for timing (%s)", why)
            with self.deploy(module, example_inputs) as deployed:
                yield deployed
            return
        yield deployed

    def _load(self, graph: onnx.ModelProto, filled: onnx.ModelProto, example_inputs: tuple,
              tensors: dict[str, torch.Tensor], origin: str) -> _OrtDeployed:
        source = self.runnable(filled.SerializeToString(), lambda: self.batches(filled, example_inputs))
        session = self.session(source)
        return _OrtDeployed(self, source, session, _feeds(session.get_inputs(), example_inputs), tensors, origin, graph)


class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """onnxruntime's CPU provider running models statically quantized to INT8 (``backends/quantize.py``):
    units, the step probe and whole models are quantized before they are timed, so tables, the latency
    step and the closed loop are the INT8 model's. Whole models are calibrated on the example inputs and
    ``calibration`` (batches of model inputs, each a tensor or a tuple of tensors)."""

    name = "onnxruntime-int8"

    def __init__(self, threads: int | None = None, warmup: int = 3, repeats: int = 15,
                 calibration: list | None = None) -> None:
        super().__init__(threads, warmup, repeats)
        self.calibration = list(calibration or [])

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "quantization": settings()}

    def runnable(self, model: bytes | str, batches: Callable[[], list[dict[str, np.ndarray]]]) -> bytes:
        return quantize_int8(model, batches())

    def calibrated(self, batches: list) -> "OnnxRuntimeInt8Engine":
        """A copy that calibrates on ``batches`` too (the engine a user passed stays as it was)."""
        engine = copy.copy(self)
        engine.calibration = self.calibration + list(batches)
        return engine

    def unquantized(self) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(self.threads)

    def batches(self, graph: onnx.ModelProto, example_inputs: tuple) -> list[dict[str, np.ndarray]]:
        inputs = _graph_inputs(graph)
        extra = [batch if isinstance(batch, (tuple, list)) else (batch,) for batch in self.calibration]
        return [_feeds(inputs, example_inputs)] + [_feeds(inputs, batch) for batch in extra]


class _OrtDeployed(Deployed):
    """A model in an onnxruntime session: its file (or bytes), the module's parameters and buffers by
    name, and where its graph came from (``origin``: exported, or resized from another's)."""

    def __init__(self, engine: OnnxRuntimeEngine, path: str | bytes, session, feeds: dict,
                 tensors: dict[str, torch.Tensor], origin: str, graph: onnx.ModelProto | None = None,
                 fp32: str | None = None) -> None:
        self.engine, self.path, self.session, self.feeds = engine, path, session, feeds
        self.tensors, self.origin, self._graph, self._fp32 = tensors, origin, graph, fp32
        self._profiled: _Profile | None = None

    def run(self) -> Any:
        return self.session.run(None, self.feeds)

    def graph(self) -> onnx.ModelProto:
        """The model's ONNX graph without its large weights (what ``resize`` starts from)."""
        if self._graph is None:  # the FP32 graph, also where the engine runs a quantized one
            source = self._fp32 or self.path
            graph = onnx.load(source) if isinstance(source, str) else onnx.load_from_string(source)
            name_transposes(graph, self.tensors)
            self._graph = strip(graph)
        return self._graph

    def profile(self) -> _Profile:
        """One profiled session of the same file (taken once: ``split`` and ``kernels`` read it)."""
        if self._profiled is None:
            self._profiled = self.engine._profile(self.path, self.feeds)
        return self._profiled

    def kernels(self) -> list[KernelTime]:
        return [KernelTime(k.op, k.inputs, k.outputs, quiet(self.engine._kernel_us(k)))
                for k in self.profile().kernels.values() if k.us]

    def split(self) -> tuple[float, float]:
        """From a profiled session of the same file: the shares of a run spent in memory-bound kernels
        and between kernels. Only shares: this machine may run that session at another speed."""
        profile = self.profile()
        kernels = [k for k in profile.kernels.values() if k.us]
        kernel_us = quiet(np.sum([self.engine._kernel_us(k) for k in kernels], axis=0))
        memory = [self.engine._kernel_us(k) for k in kernels if _moves_memory(k)]
        memory_us = quiet(np.sum(memory, axis=0)) if memory else 0.0
        run_us = max(quiet(profile.runs) - self.engine.profiler_overhead()[1] * len(kernels), kernel_us, 1e-9)
        return memory_us / run_us, (run_us - kernel_us) / run_us


@contextmanager
def _exported(module: nn.Module, example_inputs: tuple) -> Iterator[str]:
    """A file of ``module`` as fxprune exports it (dynamo exporter, cleaned), alive for the block. The
    batch is fixed at the example's: a dynamic batch makes torch.export's decompositions slower, and
    onnxruntime runs both files at the same speed (docs/latency_model.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, path, example_inputs, verify=False, dynamic_batch=False)
        yield str(path)


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _exporter_versions() -> dict[str, str | int]:
    """What an exported graph depends on besides the model: the exporter's libraries and fxprune's cleaning."""
    import onnxscript

    return {"torch": torch.__version__, "onnxscript": onnxscript.__version__, "onnx": onnx.__version__,
            "format": GRAPH_FORMAT}


def _parse_graph(value: dict) -> onnx.ModelProto:
    """A cached graph, checked: it parses and has nodes, inputs and outputs."""
    graph = onnx.load_from_string(base64.b64decode(value["onnx"], validate=True))
    if not (graph.graph.node and graph.graph.input and graph.graph.output):
        raise ValueError("the cached ONNX graph is empty")
    return graph


def _feeds(inputs: list, example_inputs: tuple | list) -> dict[str, np.ndarray]:
    """A model's inputs (a session's or a graph's) fed the leaves of the example's (a detector's list of
    images is one input per image)."""
    leaves = torch.utils._pytree.tree_leaves(example_inputs)
    return {i.name: x.detach().cpu().numpy() for i, x in zip(inputs, leaves)}


def _graph_inputs(graph: onnx.ModelProto) -> list:
    weights = {t.name for t in graph.graph.initializer}
    return [i for i in graph.graph.input if i.name not in weights]


def _trivial_chain(length: int) -> onnx.ModelProto:
    """``length`` additions of one-element tensors in a row: kernels that take no time of their own."""
    nodes, previous = [], "x"
    for index in range(length):
        nodes.append(helper.make_node("Add", [previous, "one"], [f"add{index}"], name=f"add{index}"))
        previous = f"add{index}"
    graph = helper.make_graph(nodes, "fxprune_overhead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.ones(1, dtype=np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _shape(entry: dict) -> list[int]:
    """A profile's ``{"float": [1, 64, 56, 56]}`` as a shape."""
    return [int(d) for d in next(iter(entry.values()), [])] if isinstance(entry, dict) else []


def _moves_memory(kernel: _Kernel) -> bool:
    """Memory-bound ops between layers; a bias or scale added to a layer's output is part of the layer."""
    if kernel.op not in RULES.memory_kernels and kernel.op not in OWN_MEMORY_KERNELS:
        return False
    return not (kernel.op in ("Add", "Mul") and len(kernel.inputs) == 2 and len(kernel.inputs[1]) <= 1)


def _branch_of(node: str, kind: str) -> int | None:
    """Branch index of a kernel named from a ``u{i}_`` (unit) or ``r{i}_`` (reference) prefix, or None
    (producers, layout reorders). A kernel onnxruntime fused from a branch's nodes (Gemm with its Relu) is
    named ``fused <first node>``."""
    node = node.removeprefix("fused ")
    if not node.startswith(kind):
        return None
    digits = node[1:].split("_", 1)[0]
    return int(digits) if digits.isdigit() else None


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index runs whose sizes add up to at most ``limit`` (a larger single item runs alone)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and total + size > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    return chunks + ([current] if current else [])
