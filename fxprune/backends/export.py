"""Export a model to ONNX, clean it with onnx-graphsurgeon, check it and verify it against torch in onnxruntime."""

from __future__ import annotations

import inspect
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from onnx.external_data_helper import load_external_data_for_model

from fxprune.backends.quantize import quantize_int8
from fxprune.errors import ExampleInputsError, ExportError
from fxprune.ir.capture import capture_of, flat_inputs, flat_view, is_partitioned, is_structured, split_inputs
from fxprune.ir.graph import inference

EXTERNAL_DATA_THRESHOLD = 1 << 30  # weight bytes above which they go to "<file>.data" (protobuf caps at 2 GiB)

Case = tuple[str, tuple[torch.Tensor, ...], list[tuple[str, torch.Tensor]]]  # label, inputs, named torch outputs


@dataclass
class ExportResult:
    """What export_onnx wrote, with which exporter, and how far onnxruntime was from torch."""

    path: Path
    exporter: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float | None
    num_nodes: int
    file_bytes: int
    quantized: str | None = None  # "int8": the file holds the model statically quantized (QDQ)
    int8_max_abs_diff: float | None = None  # the INT8 file against the FP32 one, over the calibration batches
    int8_top1_agreement: float | None = None  # share of rows whose first output's argmax (last axis) agrees
    dynamic_sizes: bool = False  # image sizes / sequence lengths are dynamic axes (checked at a larger size)


@dataclass(frozen=True)
class _Request:
    """What both exporters are asked for: trace inputs, ONNX names, a dynamic dim 0 or not, the opset."""

    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic: bool
    opset: int | None
    sizes: bool = False  # image sizes and sequence lengths dynamic too (``size_dims``)


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Reject example inputs that are not a non-empty tuple of tensors (or of lists of tensors: a
    detector's images), before any export work."""
    if not isinstance(example_inputs, tuple) or not example_inputs:
        got = "an empty tuple" if isinstance(example_inputs, tuple) else f"a {type(example_inputs).__name__}"
        raise ExampleInputsError(f"example_inputs must be a non-empty tuple of tensors, got {got}; "
                                 "wrap a single tensor as (x,).")
    bad = [f"[{i}] is a {type(x).__name__}" for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)
           and not (isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x))]
    if bad:
        raise ExampleInputsError(f"example_inputs must hold only tensors, but {', '.join(bad)}.")
    return example_inputs


def _flatten(value: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """Name and list the tensors of a nested output in torch.export's order (dicts in insertion order)."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [leaf for i, item in enumerate(value) for leaf in _flatten(item, f"{name}.{i}")]
    if isinstance(value, Mapping):
        prefix = "" if name == "output" else f"{name}."  # a top-level dict names the outputs by its keys
        return [leaf for key, item in value.items() for leaf in _flatten(item, f"{prefix}{key}")]
    raise ExportError(f"Output {name!r} has type {type(value).__name__}; ONNX outputs must be tensors "
                      "(alone or in tuples, lists and dicts).")


def _run_torch(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, torch.Tensor]]:
    """Run the model (``ir.graph.inference``: eval mode, no autograd) and return its named output tensors."""
    with inference(model):
        if isinstance(model, _PartOutputs):
            out, parts = model(*inputs)
            return _flatten(out, "output") + [leaf for i, part in enumerate(parts) for path, value in part.items()
                                              for leaf in _flatten(value, f"{_PART_PREFIX}{i}.{path}")]
        return _flatten(model(*inputs), "output")


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    """Name the ONNX inputs after forward's positional parameters, so users see their own names."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def double_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Concatenate each input with a perturbed copy along dim 0: a batch > 1 whose items differ."""
    generator = torch.Generator().manual_seed(0)
    doubled = []
    for x in (t.detach() for t in inputs):
        copy = x
        if x.is_floating_point():
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            copy = x + 0.1 * (x.abs().mean() + 1e-3) * noise
        doubled.append(torch.cat([x, copy]) if x.dim() else x)
    return tuple(doubled)


def _summary(exc: BaseException) -> str:
    """A one-line digest of a long exporter or runtime error (ANSI colours and boilerplate dropped)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split("## Exception summary", 1)[-1]
    return f"{type(exc).__name__}: {' '.join(text.split())[:400]}"


def _export_dynamo(model: torch.nn.Module, request: _Request, file: str) -> None:
    """torch.export-based export asking for a symbolic dim 0 on every input (verification catches a pinned one)."""
    dims: tuple = tuple({d: torch.export.Dim.DYNAMIC for d in (0, *(size_dims(x) if request.sizes else ()))}
                 if x.dim() else None for x in request.inputs)
    if isinstance(model, _KeywordCall):  # forward(*inputs): torch.export binds them as one tuple
        dims = (dims,)
    program = torch.onnx.export(model, request.inputs, file, dynamo=True, input_names=request.input_names,
                                output_names=request.output_names, dynamic_shapes=dims if request.dynamic else None,
                                opset_version=request.opset, external_data=True, verbose=False)
    assert program is not None  # dynamo=True returns the ONNXProgram
    opset = program.model.opset_imports.get("")
    if request.opset is not None and opset != request.opset:  # below 18 the version converter may give up quietly
        raise ExportError(f"the dynamo exporter produced opset {opset} instead of {request.opset}")


def _export_torchscript(model: torch.nn.Module, request: _Request, file: str) -> None:
    """Legacy TorchScript export, the fallback when torch.export cannot capture the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, request.inputs, file, dynamo=False, input_names=request.input_names,
                          output_names=request.output_names, opset_version=request.opset,
                          dynamic_axes=_axes(request) if request.dynamic else None)


def _axes(request: _Request) -> dict[str, dict[int, str]]:
    """The TorchScript exporter's dynamic axes: the batch of every input and output, sizes of the inputs."""
    axes = {name: {0: "batch"} for name in request.input_names + request.output_names}
    if request.sizes:
        for name, x in zip(request.input_names, request.inputs):
            axes[name].update({d: f"{name}_size{d}" for d in size_dims(x)})
    return axes


def size_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dims of an input a model usually takes at any size: an image's height and width (float, 4 or 5
    dims), a sequence's length (integer token ids, 2 dims)."""
    if x.is_floating_point() and x.dim() >= 4:
        return (x.dim() - 2, x.dim() - 1)
    if not x.is_floating_point() and x.dim() == 2:
        return (1,)
    return ()


def larger(x: Any) -> Any:
    """An input at another size: images 1.5x larger (multiples of 32, what detectors' strides need),
    sequences 1.5x longer; a list of images each so; anything else as it is."""
    if isinstance(x, list) and x and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in x):
        return [larger(t[None])[0] for t in x]
    if not isinstance(x, torch.Tensor) or not size_dims(x):
        return x
    if not x.is_floating_point():
        return x.repeat(1, 2)[:, :x.shape[1] + max(x.shape[1] // 2, 1)]
    size = [max(32, round(s * 1.5 / 32) * 32) for s in x.shape[-2:]]
    if x.dim() == 5:  # video: (N, C, T, H, W), frames kept
        return torch.nn.functional.interpolate(x, size=(x.shape[2], *size), mode="trilinear")
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear")


def _export_any(model: torch.nn.Module, request: _Request, file: str) -> str:
    """Try the dynamo exporter, then TorchScript; return the name of the one that worked."""
    errors = []
    for exporter, export in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
        try:
            export(model, request, file)
            return exporter
        except Exception as exc:  # noqa: BLE001 - any exporter failure moves on to the next exporter
            errors.append(f"{exporter}: {_summary(exc)}")
    hint = " If the errors are about shapes, pass dynamic_batch=False." if request.dynamic else ""
    raise ExportError("torch.onnx.export failed with both exporters:\n  " + "\n  ".join(errors)
                      + f"\nRewrite or register an ONNX translation for the failing op, or try another opset.{hint}")


def _clean(raw: Path) -> onnx.ModelProto:
    """Drop dead nodes and toposort with onnx-graphsurgeon, keeping the opsets and a valid IR version."""
    # Weights stay in the side file while graphsurgeon copies tensor protos: protobuf cannot copy one over 2 GiB.
    model = onnx.load(str(raw), load_external_data=False)
    graph = gs.import_onnx(model)
    global_pools(graph)
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    needed = onnx.helper.find_min_ir_version_for(list(cleaned.opset_import), ignore_unknown=True)
    cleaned.ir_version = max(model.ir_version, needed)
    load_external_data_for_model(cleaned, str(raw.parent))
    return cleaned


def global_pools(graph: gs.Graph) -> int:
    """Each ReduceMean over every spatial axis of a float image, dims kept, becomes GlobalAveragePool (in
    place; returns how many). The dynamo exporter writes adaptive average pooling so; onnxruntime runs
    ReduceMean outside its blocked (NCHWc) convolution layout, reordering the whole tensor around it, which
    an SE block pays twice and the TorchScript exporter's GlobalAveragePool does not."""
    count = 0
    for node in graph.nodes:
        if node.op != "ReduceMean" or node.attrs.get("keepdims", 1) != 1 or node.attrs.get("noop_with_empty_axes", 0):
            continue
        x = node.inputs[0]
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant):
            axes = node.inputs[1].values.reshape(-1).tolist()
        rank = len(x.shape) if x.shape is not None else 0
        if rank < 4 or axes is None or np.dtype(x.dtype or np.int64).kind != "f":
            continue
        if sorted(int(a) % rank for a in axes) == list(range(2, rank)):
            while len(node.inputs) > 1:  # the axes (one at a time: the list syncs the tensors' consumers)
                node.inputs.pop()
            node.op, node.attrs = "GlobalAveragePool", {}
            count += 1
    return count


def _save(model: onnx.ModelProto, path: Path) -> int:
    """Save the model (weights in a side file when they would not fit in one protobuf); return bytes on disk."""
    external = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_file = path.with_name(path.name + ".data")
    if external and data_file.exists():
        data_file.unlink()  # onnx appends to an existing data file
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file.name, size_threshold=1024)
    return path.stat().st_size + (data_file.stat().st_size if external and data_file.exists() else 0)


def _check(path: Path) -> None:
    """Run the full ONNX checker on the file (given by path, which also works beyond 2 GiB)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker and shape-inference errors have several types
        raise ExportError(f"onnx.checker rejected {path}: {_summary(exc)}. "
                          "Try another opset, or report the model with this message.") from exc


def run_onnxruntime(path: str | os.PathLike, inputs: tuple[torch.Tensor, ...], *,
                    intra_op_num_threads: int = 1) -> list[np.ndarray]:
    """Run an ONNX file on CPU with a fixed thread count (for repeatable timing and numerics), inputs in order."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra_op_num_threads, 1
    options.log_severity_level = 3  # mismatches are reported by the caller, not as runtime warnings
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [arg.name for arg in session.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"the file has {len(names)} inputs but {len(inputs)} tensors were given")
        return session.run(None, {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)})
    except Exception as exc:  # onnxruntime raises its own exception family
        raise ExportError(f"onnxruntime could not run {path}: {_summary(exc)}") from exc


def _compare(got: list[np.ndarray], case: Case, rtol: float, atol: float) -> float:
    """Check onnxruntime outputs against torch's (count, shape, max|a-b| <= atol + rtol*max|b|); return the diff.
    Where raw part outputs are listed (``part.*``), only they are compared (see ``_PartOutputs``)."""
    label, _, want = case
    if len(got) != len(want):
        raise ExportError(f"At {label}: the ONNX file has {len(got)} outputs, torch returned {len(want)}.")
    worst = 0.0
    parts_only = any(name.startswith(_PART_PREFIX) for name, _ in want)
    for array, (name, tensor) in zip(got, want):
        if parts_only and not name.startswith(_PART_PREFIX):
            continue
        ref = tensor.detach().cpu().numpy().astype(np.float64)
        if array.shape != ref.shape:
            raise ExportError(f"At {label}: output {name!r} has shape {array.shape} in onnxruntime but {ref.shape} "
                              "in torch. The graph baked in a size; pass dynamic_batch=False or fix the model.")
        array = array.astype(np.float64)  # equal values (infs, NaN pairs) count as no difference
        diffs = np.where((array == ref) | (np.isnan(array) & np.isnan(ref)), 0.0, np.abs(array - ref))
        diff, scale = float(diffs.max(initial=0.0)), float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0))
        if not diff <= atol + rtol * scale:
            raise ExportError(f"At {label}: output {name!r} differs from torch by {diff:.3g} (max |torch| "
                              f"{scale:.3g}, rtol={rtol}, atol={atol}). Raise the tolerances if the op is numerically "
                              "sensitive, or look for random, data-dependent or batch-dependent code in forward.")
        worst = max(worst, diff)
    return worst


def _verify(path: Path, cases: list[Case], rtol: float, atol: float) -> float:
    """Run the file on every case and compare with torch; return the worst absolute difference."""
    worst = 0.0
    for case in cases:
        try:
            got = run_onnxruntime(path, tuple(torch.utils._pytree.tree_leaves(case[1])))
        except ExportError as exc:
            raise ExportError(f"At {case[0]}: {exc}. If only the doubled batch fails, the graph baked in the "
                              "batch size; pass dynamic_batch=False or make forward batch-agnostic.") from exc
        worst = max(worst, _compare(got, case, rtol, atol))
    return worst


_PART_PREFIX = "part."


class _PartOutputs(torch.nn.Module):
    """A model captured in parts, returning its parts' raw outputs after its own. Post-processing (score
    thresholds, top-k, NMS) turns last-digit differences between torch and onnxruntime into other boxes,
    so a whole detector is verified on what its parts upstream of any post-processing return (``Part.raw``:
    the backbone's features, the dense heads' raw outputs)."""

    def __init__(self, model: torch.nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.model, self.paths = model, paths

    def forward(self, *args: Any) -> tuple:
        returned: list = []
        hooks = [self.model.get_submodule(path).register_forward_hook(
            lambda module, a, out, path=path: returned.append({path: out})) for path in self.paths]
        try:
            out = self.model(*args)
        finally:
            for hook in hooks:
                hook.remove()
        return out, returned


class _KeywordCall(torch.nn.Module):
    """A model called with keyword inputs (a Hugging Face model's ``input_ids=``, ``attention_mask=``), as
    exporters call it: every input positional, the keywords after the positional ones, in their order."""

    def __init__(self, model: torch.nn.Module, positional: int, keywords: list[str]) -> None:
        super().__init__()
        self.model, self.positional, self.keywords = model, positional, keywords

    def forward(self, *inputs: Any) -> Any:
        args, values = inputs[:self.positional], inputs[self.positional:]
        return self.model(*args, **dict(zip(self.keywords, values)))


def _part_paths(model: torch.nn.Module) -> list[str]:
    """The raw parts of a model fxprune assembled from parts (not of the stitched graph itself)."""
    capture = capture_of(model)
    if isinstance(model, torch.fx.GraphModule) or capture is None or not is_partitioned(model):
        return []
    return [part.path for part in capture.parts if part.raw]


def _reference(model: torch.nn.Module, inputs: tuple, dynamic: bool, verify: bool,
               sizes: bool = False) -> tuple[list[Case], tuple]:
    """Torch outputs for the verification cases, and the inputs to trace (a doubled batch when dim 0 is
    dynamic); with ``sizes``, a case at a larger image size or longer sequence too."""
    try:
        cases = [("the example batch", inputs, _run_torch(model, inputs))]
    except ExportError:
        raise
    except Exception as exc:  # whatever forward raises means the inputs do not fit
        raise ExampleInputsError(f"The model raised on example_inputs: {_summary(exc)}") from exc
    if not dynamic:
        return cases, inputs
    doubled = double_batch(inputs)  # tracing at batch > 1 avoids 0/1 specialization and batch-1-only branches
    if verify:
        try:
            cases.append(("a doubled batch", doubled, _run_torch(model, doubled)))
        except Exception as exc:
            raise ExportError(f"The model raised on a doubled batch: {_summary(exc)}. "
                              "Pass dynamic_batch=False if it only supports the example batch size.") from exc
    if sizes and verify:
        other = tuple(larger(x) for x in inputs)
        cases.append(("a larger size", other, _run_torch(model, other)))
    return cases, doubled


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any, *,
                example_kwargs: dict | None = None, dynamic_batch: bool = True, opset: int | None = None,
                verify: bool = True, rtol: float = 1e-4, atol: float = 1e-4, input_names: list[str] | None = None,
                output_names: list[str] | None = None, quantize: str | None = None,
                calibration: Iterable[Any] | None = None, dynamic_sizes: bool = False) -> ExportResult:
    """Export the model (in eval mode, left unchanged) to a cleaned, checked ONNX file verified in onnxruntime.

    ``quantize="int8"``: the file written is the model statically quantized (``backends/quantize.py``),
    activations calibrated on the example inputs and ``calibration`` (batches of model inputs, each a
    tensor or a tuple of tensors); checked, run in onnxruntime, and compared with the FP32 export on those
    batches (``int8_max_abs_diff``, ``int8_top1_agreement``).

    ``input_names``/``output_names`` name the ONNX graph's inputs and outputs (default: forward's
    parameters, and the outputs' structure), e.g. ``["images"]``/``["output0"]`` as ultralytics names them.

    ``dynamic_sizes``: with a dynamic batch, image sizes and sequence lengths are dynamic too where the
    model runs at another size and the file matches torch there (``ExportResult.dynamic_sizes`` says
    whether they are); else (the default) the file keeps the example's sizes. A file with symbolic sizes
    ran 4-8.5% slower in onnxruntime CPU than one with the example's (a one-off timing, docs/latency.md's
    notes), which is why a deployment file, like ``torch.onnx.export``'s and ultralytics', fixes them unless
    asked.

    A module fxprune captured through torch.export is called as the model was (keyword inputs, lists,
    nested outputs); its ONNX graph takes the leaves of those inputs and returns the leaves of its outputs,
    at the example's batch size (torch.export's graph holds its sizes as numbers).
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r}: fxprune writes quantize='int8' (static, QDQ) or None (FP32)")
    if is_structured(model):  # called as the model was: its ONNX graph takes the leaves
        example_inputs = flat_inputs(model, *split_inputs(example_inputs, example_kwargs))
        model, dynamic_batch = flat_view(model), False
    elif isinstance(example_inputs, dict) or example_kwargs:  # keyword inputs: ONNX inputs named by keyword
        args, kwargs = split_inputs(example_inputs, example_kwargs)
        model, example_inputs = _KeywordCall(model, len(args), list(kwargs)), (*args, *kwargs.values())
    inputs, path = _check_inputs(example_inputs), Path(path)
    nested = any(isinstance(x, (list, tuple)) for x in inputs)
    if nested:  # lists of images (a whole detector): the ONNX graph takes the images
        dynamic_batch = False
    paths = _part_paths(model)
    if paths:  # exported with the parts' raw outputs for verification; the file keeps the model's own
        model = _PartOutputs(model, paths)
    sizes = dynamic_sizes and dynamic_batch and not paths and any(size_dims(x) for x in inputs) \
        and _runs(model, tuple(larger(x) for x in inputs))
    try:
        return _export_verified(model, path, inputs, dynamic_batch, sizes, opset, verify, rtol, atol, input_names,
                                output_names, nested, paths, quantize, calibration)
    except ExportError:
        if not sizes:
            raise
    return _export_verified(model, path, inputs, dynamic_batch, False, opset, verify, rtol, atol, input_names,
                            output_names, nested, paths, quantize, calibration)


def _runs(model: torch.nn.Module, inputs: tuple) -> bool:
    """Whether the model runs on ``inputs`` (the original size is not the only one it takes)."""
    try:
        _run_torch(model, inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means it does not take this size
        return False


def _export_verified(model: torch.nn.Module, path: Path, inputs: tuple, dynamic_batch: bool, sizes: bool,
                     opset: int | None, verify: bool, rtol: float, atol: float, input_names: list[str] | None,
                     output_names: list[str] | None, nested: bool, paths: list[str], quantize: str | None,
                     calibration: Iterable[Any] | None) -> ExportResult:
    """One export of ``model`` with the dims asked for, cleaned, checked and verified on every case."""
    with inference(model, grad=None):
        cases, trace_inputs = _reference(model, inputs, dynamic_batch, verify, sizes)
        names = list(model.keywords) if isinstance(model, _KeywordCall) and not model.positional else \
            _input_names(model.model if isinstance(model, _PartOutputs) else model, len(inputs))
        if nested:
            names = [f"{name}_{i}" if isinstance(x, (list, tuple)) else name
                     for name, x in zip(names, inputs) for i in range(len(x) if isinstance(x, (list, tuple)) else 1)]
        outputs = [name for name, _ in cases[0][2]]
        for given, defaults, what in ((input_names, names, "input"), (output_names, outputs, "output")):
            if given is not None and len(given) > len(defaults):
                raise ExportError(f"{len(given)} {what}_names given, but the model has {len(defaults)} {what}s")
        names = list(input_names or []) + names[len(input_names or []):]
        outputs = list(output_names or []) + outputs[len(output_names or []):]
        cases = [(label, case_inputs, [(o, t) for o, (_, t) in zip(outputs, named)])
                 for label, case_inputs, named in cases]
        request = _Request(trace_inputs, names, outputs, dynamic_batch, opset, sizes)
        with tempfile.TemporaryDirectory() as tmp:
            exporter = _export_any(model, request, str(Path(tmp) / "raw.onnx"))
            proto = _clean(Path(tmp) / "raw.onnx")
            if paths:
                _save(proto, Path(tmp) / "with_parts.onnx")
                diff = _verify(Path(tmp) / "with_parts.onnx", cases, rtol, atol) if verify else None
                proto = _without_outputs(proto, _PART_PREFIX)
    file_bytes = _save(proto, path)
    _check(path)
    if not paths:
        diff = _verify(path, cases, rtol, atol) if verify else None
    result = ExportResult(
        path=path, exporter=exporter, opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        input_names=[i.name for i in proto.graph.input], output_names=[o.name for o in proto.graph.output],
        max_abs_diff=diff, num_nodes=len(proto.graph.node), file_bytes=file_bytes, dynamic_sizes=sizes,
    )
    return _quantized(result, inputs, calibration) if quantize else result


def _quantized(result: ExportResult, inputs: tuple, calibration: Iterable[Any] | None) -> ExportResult:
    """The FP32 file at ``result.path`` replaced by its INT8 quantization, checked, run in onnxruntime and
    compared with the FP32 file on the calibration batches."""
    batches = [tuple(torch.utils._pytree.tree_leaves(inputs))]
    for batch in calibration or []:
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        batches.append(tuple(torch.utils._pytree.tree_leaves(tuple(batch))))
    names = result.input_names
    if any(len(batch) != len(names) for batch in batches):
        raise ExportError(f"calibration batches must hold the model's {len(names)} inputs, as example_inputs does")
    fp32 = [run_onnxruntime(result.path, batch) for batch in batches]
    quantized = quantize_int8(result.path, [{n: x.detach().cpu().numpy() for n, x in zip(names, batch)}
                                            for batch in batches])
    data_file = result.path.with_name(result.path.name + ".data")
    if data_file.exists():
        data_file.unlink()
    result.path.write_bytes(quantized)
    _check(result.path)
    int8 = [run_onnxruntime(result.path, batch) for batch in batches]
    worst, agree, rows = 0.0, 0, 0
    for expected, got in zip(fp32, int8):
        for a, b in zip(expected, got):
            if np.issubdtype(np.asarray(a).dtype, np.floating) and np.size(a):
                worst = max(worst, float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b))))
        first, second = np.asarray(expected[0]), np.asarray(got[0])
        if np.issubdtype(first.dtype, np.floating) and first.ndim >= 1 and first.shape[-1] > 1:
            agree += int((first.argmax(-1) == second.argmax(-1)).sum())
            rows += int(np.prod(first.shape[:-1]))
    result.quantized, result.file_bytes = "int8", len(quantized)
    result.int8_max_abs_diff, result.int8_top1_agreement = worst, (agree / rows if rows else None)
    return result


def _without_outputs(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """The model without the outputs named ``prefix*`` and the nodes only they needed."""
    graph = gs.import_onnx(model)
    graph.outputs = [t for t in graph.outputs if not t.name.startswith(prefix)]
    graph.cleanup().toposort()
    trimmed = gs.export_onnx(graph)
    trimmed.ir_version = model.ir_version
    return trimmed
